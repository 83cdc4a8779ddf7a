"""QUOTAD_REDIS_PASSWORD and QUOTAD_REDIS_TLS_* against a real Valkey that requires a password,
reached through a real TLS terminator that requires a client certificate (the embedded Valkey
build has no TLS of its own; managed Redis services terminate TLS the same way): one server,
and a cluster of three shards."""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import ssl
import subprocess
import tempfile
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from quotad.v1 import quota_pb2 as pb
from quotad_server.store.embedded import EmbeddedRedis, free_port

from tests.e2e.quotad_process import POLICY, Process

PASSWORD = "test-only-password"


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=60)


@pytest.fixture(scope="module")
def pki() -> Iterator[Path]:
    """A throwaway CA, a server certificate for 127.0.0.1 and a client certificate, all signed by it."""
    if shutil.which("openssl") is None:
        pytest.fail("openssl is needed to make test certificates: apt-get install openssl")
    with tempfile.TemporaryDirectory(prefix="quotad-pki-") as directory:
        root = Path(directory)
        _openssl(
            "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=quotad test CA",
            "-keyout", "ca.key", "-out", "ca.crt", cwd=root,
        )  # fmt: skip
        for name, extension in (
            ("server", "subjectAltName=IP:127.0.0.1"),
            ("client", "extendedKeyUsage=clientAuth"),
        ):
            _openssl(
                "req", "-newkey", "rsa:2048", "-nodes", "-subj", f"/CN={name}",
                "-keyout", f"{name}.key", "-out", f"{name}.csr", cwd=root,
            )  # fmt: skip
            (root / f"{name}.ext").write_text(extension + "\n")
            _openssl(
                "x509", "-req", "-in", f"{name}.csr", "-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial",
                "-days", "1", "-extfile", f"{name}.ext", "-out", f"{name}.crt", cwd=root,
            )  # fmt: skip
        yield root


@pytest.fixture
def redis_with_password() -> Iterator[EmbeddedRedis]:
    server = EmbeddedRedis()
    server.process = subprocess.Popen(
        [
            str(EmbeddedRedis.binary()), "--port", str(server.port), "--bind", "127.0.0.1",
            "--save", "", "--appendonly", "no", "--requirepass", PASSWORD,
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        yield server
    finally:
        server.stop()


def client_tls(pki: Path) -> dict[str, str]:
    """The settings that verify Redis's certificate against the test CA and present the client's."""
    return {
        "QUOTAD_REDIS_TLS_CA_FILE": str(pki / "ca.crt"),
        "QUOTAD_REDIS_TLS_CERT_FILE": str(pki / "client.crt"),
        "QUOTAD_REDIS_TLS_KEY_FILE": str(pki / "client.key"),
    }


@contextlib.asynccontextmanager
async def tls_terminator(pki: Path, upstream_port: int) -> AsyncIterator[int]:
    """TLS on a free port (client certificate required), plain TCP to upstream_port."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=str(pki / "ca.crt"))
    context.load_cert_chain(pki / "server.crt", pki / "server.key")
    context.verify_mode = ssl.CERT_REQUIRED

    async def pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(ConnectionError, OSError):
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        writer.close()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", upstream_port)
        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))

    port = free_port()
    server = await asyncio.start_server(handle, "127.0.0.1", port, ssl=context)
    try:
        yield port
    finally:
        server.close()


async def test_password_and_mutual_tls_settings_reach_redis(
    tmp_path: Path, pki: Path, redis_with_password: EmbeddedRedis
) -> None:
    policy = tmp_path / "policy.yaml"
    policy.write_text(POLICY)
    async with tls_terminator(pki, redis_with_password.port) as tls_port:
        quotad = Process(
            tmp_path,
            f"rediss://127.0.0.1:{tls_port}/0",
            policy,
            QUOTAD_REDIS_PASSWORD=PASSWORD,
            **client_tls(pki),
        )
        try:
            await quotad.wait_serving()
            reply = await quotad.stub.CheckAndReserve(pb.CheckAndReserveRequest(subject="alice"), timeout=5)
            assert reply.decision == pb.DECISION_ALLOWED
        finally:
            await quotad.close()

        # Without the password, Redis refuses: health never becomes SERVING and the log says why.
        unauthenticated = Process(
            tmp_path,
            f"rediss://127.0.0.1:{tls_port}/0",
            policy,
            **client_tls(pki),
        )
        try:
            deadline = asyncio.get_running_loop().time() + 10
            while "redis is not reachable at start" not in unauthenticated.log.read_text():
                assert asyncio.get_running_loop().time() < deadline, unauthenticated.log.read_text()
                await asyncio.sleep(0.05)
            assert "authenticated" in unauthenticated.log.read_text().lower()
        finally:
            await unauthenticated.close()


async def test_mutual_tls_and_a_password_to_a_cluster_of_three_shards(tmp_path: Path, pki: Path) -> None:
    """`rediss://` seeds: valkey-glide's cluster client verifies each shard's certificate against
    the CA file and presents the client certificate, to every node the cluster announces (here
    each node announces its TLS terminator's port, as a managed service announces its TLS
    endpoints); every shard decides some of the tenants' requests."""
    shards = 3
    policy = tmp_path / "policy.yaml"
    policy.write_text(POLICY)
    nodes: list[EmbeddedRedis] = []
    buses: list[int] = []
    async with contextlib.AsyncExitStack() as stack:
        for _ in range(shards):
            node = EmbeddedRedis()
            # The terminator first: its port is what the node announces to the cluster's clients.
            tls_port = await stack.enter_async_context(tls_terminator(pki, node.port))
            buses.append(_start_cluster_node(node, tls_port, tmp_path))
            stack.callback(node.stop)
            nodes.append(node)
        admin = [redis.Redis(port=node.port, password=PASSWORD) for node in nodes]
        for client in admin:
            stack.callback(client.close)
        await _form_cluster(admin, nodes[0].port, buses[0])
        seeds = ",".join(f"127.0.0.1:{port}" for port in _announced_ports(admin[0]))
        quotad = Process(
            tmp_path,
            f"rediss://{seeds}/0",
            policy,
            QUOTAD_REDIS_CLUSTER="true",
            QUOTAD_REDIS_PASSWORD=PASSWORD,
            **client_tls(pki),
        )
        try:
            await quotad.wait_serving()
            for index in range(60):
                request = pb.CheckAndReserveRequest(subject="alice", tenant=f"tenant-{index}")
                reply = await quotad.stub.CheckAndReserve(request, timeout=5)
                assert reply.decision == pb.DECISION_ALLOWED
        finally:
            await quotad.close()
        for client in admin:  # every shard ran some decisions (each tenant is its own slot)
            assert client.info("commandstats").get("cmdstat_evalsha", {}).get("calls", 0) > 0


def _start_cluster_node(node: EmbeddedRedis, announced_port: int, directory: Path) -> int:
    """A cluster node that requires the password and announces `announced_port` to clients;
    returns its cluster bus port."""
    bus = free_port()
    node.process = subprocess.Popen(
        [
            str(EmbeddedRedis.binary()), "--port", str(node.port), "--bind", "127.0.0.1",
            "--save", "", "--appendonly", "no", "--requirepass", PASSWORD, "--masterauth", PASSWORD,
            "--cluster-enabled", "yes", "--cluster-config-file", f"nodes-{node.port}.conf",
            "--dir", str(directory), "--cluster-port", str(bus),
            "--cluster-announce-port", str(announced_port), "--cluster-announce-bus-port", str(bus),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )  # fmt: skip
    return bus


async def _form_cluster(admin: list[redis.Redis], first_port: int, first_bus: int) -> None:
    slots, shards = 16384, len(admin)
    deadline = asyncio.get_running_loop().time() + 30
    for index, client in enumerate(admin):
        while True:  # the node is up once it answers
            try:
                client.ping()
                break
            except redis.ConnectionError:
                assert asyncio.get_running_loop().time() < deadline, "a cluster node did not start"
                await asyncio.sleep(0.05)
        client.cluster("ADDSLOTSRANGE", index * slots // shards, (index + 1) * slots // shards - 1)
    for client in admin[1:]:
        client.cluster("MEET", "127.0.0.1", first_port, first_bus)
    while True:  # the nodes learn of each other by gossip
        states = [client.cluster("INFO") for client in admin]
        if all(s.get("cluster_state") == "ok" and str(s.get("cluster_size")) == str(shards) for s in states):
            return
        assert asyncio.get_running_loop().time() < deadline, f"the cluster did not form: {states}"
        await asyncio.sleep(0.05)


def _announced_ports(client: redis.Redis) -> list[int]:
    """The ports the cluster announces for its primaries (here, their TLS terminators')."""
    slots: list[list[Any]] = client.cluster("SLOTS")
    return sorted({int(slot[2][1]) for slot in slots})

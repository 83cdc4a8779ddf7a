"""QUOTAD_REDIS_PASSWORD and QUOTAD_REDIS_TLS_* against a real Valkey that requires a password,
reached through a real TLS terminator that requires a client certificate (the embedded Valkey
build has no TLS of its own; managed Redis services terminate TLS the same way)."""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import ssl
import subprocess
import tempfile
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
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
            QUOTAD_REDIS_TLS_CA_FILE=str(pki / "ca.crt"),
            QUOTAD_REDIS_TLS_CERT_FILE=str(pki / "client.crt"),
            QUOTAD_REDIS_TLS_KEY_FILE=str(pki / "client.key"),
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
            QUOTAD_REDIS_TLS_CA_FILE=str(pki / "ca.crt"),
            QUOTAD_REDIS_TLS_CERT_FILE=str(pki / "client.crt"),
            QUOTAD_REDIS_TLS_KEY_FILE=str(pki / "client.key"),
        )
        try:
            deadline = asyncio.get_running_loop().time() + 10
            while "redis is not reachable at start" not in unauthenticated.log.read_text():
                assert asyncio.get_running_loop().time() < deadline, unauthenticated.log.read_text()
                await asyncio.sleep(0.05)
            assert "authenticated" in unauthenticated.log.read_text().lower()
        finally:
            await unauthenticated.close()

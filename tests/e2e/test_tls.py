"""`quotad serve` configured as the Helm chart runs it with mutual TLS: TLS on the port, client
certificates required, bearer tokens, the policy's callers keyed by SPIFFE IDs, unknown tenants
shared, probes over the local socket. Real TLS, with certificates made here (tests/pki.py).
"""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from quotad.v1 import quota_pb2 as pb
from quotad.v1 import quota_pb2_grpc as pb_grpc
from quotad_server.auth import hash_token
from quotad_server.store.embedded import EmbeddedRedis, free_port

from tests.e2e.quotad_process import QUOTAD
from tests.pki import Pair, Pki

ALPHA = "spiffe://test.local/ns/alpha/sa/api"
BETA = "spiffe://test.local/ns/beta/sa/api"
POLICY = f"""\
defaults: {{tenant: alpha, tier: free}}
unknown_tenants: shared
tiers:
  free: {{limits: [{{name: tokens, metric: total_tokens, limit: 1000, period: 1m}}]}}
  premium: {{limits: [{{name: tokens, metric: total_tokens, limit: 100000, period: 1m}}]}}
tenants:
  alpha: {{limits: []}}
  beta: {{limits: []}}
  "*": {{limits: [{{name: tenant-rpm, metric: requests, limit: 2, period: 1m}}]}}
callers:
  "{ALPHA}": {{tenants: {{alpha: {{tier: free}}}}}}
  "{BETA}": {{tenants: {{beta: {{tiers: [free, premium]}}}}}}
  "spiffe://test.local/ns/jobs/*": {{tenants: {{"*": {{}}}}}}
  batch-job: {{tenants: {{alpha: {{}}}}}}
"""
TOKEN = "batch-job-token"


@dataclass
class Deployment:
    """A TLS quotad and what its clients hold."""

    address: str
    pki: Pki
    server: Pair
    clients: dict[str, Pair]
    env: dict[str, str]
    process: subprocess.Popen[bytes]
    log: Path

    def credentials(self, client: str | None, *, roots: Path | None = None) -> grpc.ChannelCredentials:
        root = (roots or self.pki.ca).read_bytes()
        if client is None:
            return grpc.ssl_channel_credentials(root)
        cert, key = self.clients[client].read()
        return grpc.ssl_channel_credentials(root, key, cert)

    def channel(self, client: str | None, *, roots: Path | None = None) -> grpc.aio.Channel:
        return grpc.aio.secure_channel(self.address, self.credentials(client, roots=roots))


@pytest.fixture(scope="module")
def deployment(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Deployment]:
    root = tmp_path_factory.mktemp("tls")
    pki = Pki(root)
    stranger = Pki(root, "stranger")  # a CA nobody here trusts
    clients = {
        "alpha": pki.issue("alpha", sans=f"URI:{ALPHA}", client=True),
        "beta": pki.issue("beta", sans=f"URI:{BETA}", client=True),
        "job": pki.issue("job", sans="URI:spiffe://test.local/ns/jobs/sa/nightly", client=True),
        "expired": pki.issue("expired", sans=f"URI:{ALPHA}", client=True, days=-1),
        "stranger": stranger.issue("stranger", sans=f"URI:{ALPHA}", client=True),
    }
    # The server's files live where a Secret would be mounted: rewritten in place to rotate them.
    mounted = root / "mounted"
    mounted.mkdir()
    server = pki.server()
    shutil.copy(server.cert, mounted / "tls.crt")
    shutil.copy(server.key, mounted / "tls.key")
    (root / "tokens").write_text(f"batch-job {hash_token(TOKEN)}\n")
    (root / "policy.yaml").write_text(POLICY)
    socket_dir = Path(tempfile.mkdtemp(prefix="quotad-"))  # a Unix socket path must stay short
    with EmbeddedRedis() as redis_server:
        address = f"127.0.0.1:{free_port()}"
        env = {
            **os.environ,
            "QUOTAD_POLICY": str(root / "policy.yaml"),
            "QUOTAD_LISTEN": address,
            "QUOTAD_REDIS_URL": redis_server.url,
            "QUOTAD_LOG_FORMAT": "json",
            "QUOTAD_HEALTH_INTERVAL_MS": "100",
            "QUOTAD_TLS_CERT": str(mounted / "tls.crt"),
            "QUOTAD_TLS_KEY": str(mounted / "tls.key"),
            "QUOTAD_TLS_CLIENT_CA": str(pki.ca),
            "QUOTAD_TOKENS_FILE": str(root / "tokens"),
            "QUOTAD_LOCAL_SOCKET": str(socket_dir / "quotad.sock"),
        }
        log = root / "quotad.log"
        with log.open("w") as output:
            process = subprocess.Popen([*QUOTAD, "serve"], env=env, stderr=output)
        try:
            deadline = time.monotonic() + 30
            while _health(env) != 0:  # `quotad health`, as the chart's probes run it
                assert process.poll() is None, log.read_text()
                assert time.monotonic() < deadline, log.read_text()
                time.sleep(0.1)
            yield Deployment(
                address, pki, Pair(mounted / "tls.crt", mounted / "tls.key"), clients, env, process, log
            )
        finally:
            process.terminate()
            process.wait(15)
            shutil.rmtree(socket_dir, ignore_errors=True)


def _health(env: dict[str, str], service: str = "") -> int:
    command = [*QUOTAD, "health", *(["--service", service] if service else [])]
    return subprocess.run(command, env=env, capture_output=True, timeout=30, check=False).returncode


async def _reserve(channel: grpc.aio.Channel, **fields: Any) -> pb.CheckAndReserveResponse:
    stub = pb_grpc.QuotaServiceStub(channel)
    request = pb.CheckAndReserveRequest(**{"subject": "alice", "input_tokens": 10, **fields})
    return await stub.CheckAndReserve(request, timeout=5)


async def _code(call: Any) -> grpc.StatusCode:
    try:
        await call
    except grpc.aio.AioRpcError as error:
        return error.code()
    return grpc.StatusCode.OK


@pytest.fixture
async def channels(deployment: Deployment) -> AsyncIterator[dict[str, grpc.aio.Channel]]:
    opened = {name: deployment.channel(name) for name in ("alpha", "beta", "job")}
    yield opened
    for channel in opened.values():
        await channel.close()


async def test_plaintext_is_refused(deployment: Deployment) -> None:
    async with grpc.aio.insecure_channel(deployment.address) as channel:
        assert await _code(_reserve(channel)) is grpc.StatusCode.UNAVAILABLE
        health: Any = health_pb2_grpc.HealthStub(channel)
        assert (
            await _code(health.Check(health_pb2.HealthCheckRequest(), timeout=5))
            is grpc.StatusCode.UNAVAILABLE
        )


@pytest.mark.parametrize(
    "client", [None, "stranger", "expired"], ids=["no-certificate", "unknown-ca", "expired"]
)
async def test_a_client_certificate_that_does_not_verify_is_refused(
    deployment: Deployment, client: str | None
) -> None:
    async with deployment.channel(client) as channel:
        assert await _code(_reserve(channel)) is grpc.StatusCode.UNAVAILABLE  # the handshake fails


async def test_a_server_the_client_does_not_trust_is_refused(deployment: Deployment, tmp_path: Path) -> None:
    other = Pki(tmp_path, "other")
    async with deployment.channel("alpha", roots=other.ca) as channel:
        assert await _code(_reserve(channel)) is grpc.StatusCode.UNAVAILABLE


async def test_health_and_reflection_are_served_under_the_same_rules(
    deployment: Deployment, channels: dict[str, grpc.aio.Channel]
) -> None:
    health: Any = health_pb2_grpc.HealthStub(channels["alpha"])
    reply = await health.Check(health_pb2.HealthCheckRequest(service="quotad.v1.QuotaService"), timeout=5)
    assert reply.status == health_pb2.HealthCheckResponse.SERVING
    reflection: Any = reflection_pb2_grpc.ServerReflectionStub(cast(Any, channels["alpha"]))  # an aio channel

    async def ask() -> AsyncIterator[reflection_pb2.ServerReflectionRequest]:
        yield reflection_pb2.ServerReflectionRequest(list_services="")

    answers = [answer async for answer in reflection.ServerReflectionInfo(ask(), timeout=5)]
    assert "quotad.v1.QuotaService" in {s.name for s in answers[0].list_services_response.service}
    assert await asyncio.to_thread(_health, deployment.env, "liveness") == 0  # the exec probe's way in


async def test_every_escalation_is_refused(channels: dict[str, grpc.aio.Channel]) -> None:
    alpha, beta, job = channels["alpha"], channels["beta"], channels["job"]
    # A tier upgrade: alpha's tier is fixed.
    assert await _code(_reserve(alpha, tier="premium")) is grpc.StatusCode.PERMISSION_DENIED
    mine = await _reserve(alpha)
    assert (mine.decision, mine.tenant, mine.tier) == (pb.DECISION_ALLOWED, "alpha", "free")
    # Another tenant's reservations and counters.
    theirs = await _reserve(beta, tier="premium")
    assert theirs.decision == pb.DECISION_ALLOWED
    stub = pb_grpc.QuotaServiceStub(alpha)
    for call in (
        _reserve(alpha, tenant="beta"),
        stub.Commit(pb.CommitRequest(reservation_id=theirs.reservation_id, input_tokens=1), timeout=5),
        stub.Release(pb.ReleaseRequest(reservation_id=theirs.reservation_id), timeout=5),
        stub.GetUsage(pb.GetUsageRequest(subject="alice", tenant="beta"), timeout=5),
    ):
        assert await _code(call) is grpc.StatusCode.PERMISSION_DENIED
    released = await pb_grpc.QuotaServiceStub(beta).Release(
        pb.ReleaseRequest(reservation_id=theirs.reservation_id), timeout=5
    )
    assert not released.repeat  # untouched until its owner settled it
    # Rotating tenant names: every unnamed tenant shares one tenant-rpm of 2.
    answers = [await _reserve(job, tenant=f"rotated-{n}") for n in range(3)]
    assert [a.decision for a in answers] == [pb.DECISION_ALLOWED, pb.DECISION_ALLOWED, pb.DECISION_DENIED]


async def test_a_bearer_token_names_its_caller(deployment: Deployment) -> None:
    """Over mTLS (any verified certificate), a token names the caller it stands for."""
    async with deployment.channel("job") as channel:
        stub = pb_grpc.QuotaServiceStub(channel)
        request = pb.CheckAndReserveRequest(subject="bob", input_tokens=1)
        answer = await stub.CheckAndReserve(
            request, metadata=(("authorization", f"Bearer {TOKEN}"),), timeout=5
        )
        assert answer.tenant == "alpha"  # batch-job acts for alpha only
        refused = stub.CheckAndReserve(
            pb.CheckAndReserveRequest(subject="bob", tenant="beta"),
            metadata=(("authorization", f"Bearer {TOKEN}"),),
            timeout=5,
        )
        assert await _code(refused) is grpc.StatusCode.PERMISSION_DENIED


async def test_a_rotated_certificate_is_served_and_no_open_call_drops(
    deployment: Deployment, tmp_path: Path
) -> None:
    """cert-manager rewrites the mounted files: new connections get the new certificate; the
    connection already open goes on (its client trusts only the old CA, so a reconnect would fail)."""
    rotated = Pki(tmp_path, "rotated")
    both = tmp_path / "both.crt"
    both.write_bytes(deployment.pki.ca.read_bytes() + rotated.ca.read_bytes())
    new = rotated.server("rotated-server")
    failures: list[grpc.StatusCode] = []
    async with deployment.channel("alpha") as old:
        assert (await _reserve(old, subject="steady")).decision == pb.DECISION_ALLOWED
        done = asyncio.Event()

        async def steady() -> None:
            while not done.is_set():
                code = await _code(_reserve(old, subject="steady", input_tokens=1))
                if code not in (grpc.StatusCode.OK,):
                    failures.append(code)
                await asyncio.sleep(0.01)

        caller = asyncio.ensure_future(steady())
        original = deployment.server.read()
        try:
            await asyncio.to_thread(_replace, deployment.server, new)
            async with deployment.channel("alpha", roots=rotated.ca) as fresh:
                deadline = time.monotonic() + 10
                while True:  # the next handshake serves the new certificate
                    if await _code(_reserve(fresh, subject="fresh")) is grpc.StatusCode.OK:
                        break
                    assert time.monotonic() < deadline, deployment.log.read_text()[-2000:]
                    await asyncio.sleep(0.05)
            async with deployment.channel("alpha", roots=both) as either:
                assert await _code(_reserve(either, subject="either")) is grpc.StatusCode.OK
        finally:
            done.set()
            await caller
            await asyncio.to_thread(_restore, deployment.server, original)
    assert failures == [], failures
    assert "TLS certificate reloaded" in deployment.log.read_text()


def _replace(mounted: Pair, new: Pair) -> None:
    for source, target in ((new.cert, mounted.cert), (new.key, mounted.key)):
        staged = target.with_suffix(".new")
        shutil.copy(source, staged)
        os.replace(staged, target)


def _restore(mounted: Pair, original: tuple[bytes, bytes]) -> None:
    for target, content in zip((mounted.cert, mounted.key), original, strict=True):
        staged = target.with_suffix(".new")
        staged.write_bytes(content)
        os.replace(staged, target)

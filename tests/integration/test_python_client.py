"""The Python SDK (`quotad.QuotaClient`, `quotad.SyncQuotaClient`) against a live quotad.

Real Valkey, real gRPC over loopback, Redis's own clock. Where a test needs the network
to misbehave (a lost answer) or to see what reaches the server (metadata), a real gRPC
proxy sits between the client and quotad and forwards raw bytes.
"""

from __future__ import annotations

import asyncio
import subprocess
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import timedelta
from types import SimpleNamespace
from typing import Any

import grpc
import pytest
from quotad import (
    FailedPrecondition,
    InvalidArgument,
    QuotaClient,
    QuotaDenied,
    SyncQuotaClient,
    Unavailable,
    pb,
)

from tests.conftest import Quotad, QuotadFactory

POLICY = """
    defaults: {tier: free}
    leases: {default: 30s, min: 1s, max: 10m}
    models: {gpt-4o: {}}
    tiers:
      free:
        limits:
          - {name: tokens-per-day, metric: total_tokens, limit: 1000, period: 1d}
          - {name: in-flight, metric: concurrent, limit: 2}
      burst:
        limits:
          - {name: one-per-300ms, metric: requests, limit: 1, period: 300ms, algorithm: sliding_window}
"""
MODEL = "gpt-4o"


def remaining(usage: pb.GetUsageResponse) -> dict[str, int]:
    return {status.name: status.remaining for status in usage.limits}


@asynccontextmanager
async def client_for(q: Quotad, **kwargs: Any) -> AsyncIterator[QuotaClient]:
    async with QuotaClient(f"127.0.0.1:{q.port}", timeout=5, **kwargs) as client:
        yield client


@dataclass
class Proxy:
    """A gRPC hop that forwards raw bytes to quotad, records metadata, and can lose answers."""

    upstream: grpc.aio.Channel
    lose_answers: dict[str, int] = field(default_factory=dict)  # method -> answers still to lose
    calls: list[tuple[str, dict[str, str]]] = field(default_factory=list)

    def handler(self) -> grpc.GenericRpcHandler:
        proxy = self

        class Forward(grpc.GenericRpcHandler):
            def service(self, details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler[bytes, bytes]:
                method: str = details.method

                async def forward(request: bytes, context: grpc.aio.ServicerContext[bytes, bytes]) -> bytes:
                    metadata = {key: str(value) for key, value in context.invocation_metadata() or ()}
                    proxy.calls.append((method, metadata))
                    call: grpc.aio.UnaryUnaryMultiCallable[bytes, bytes] = proxy.upstream.unary_unary(method)
                    answer: bytes = await call(request, timeout=5)
                    if proxy.lose_answers.get(method, 0) > 0:
                        proxy.lose_answers[method] -= 1
                        await context.abort(grpc.StatusCode.UNAVAILABLE, "answer lost on the way back")
                    return answer

                return grpc.unary_unary_rpc_method_handler(forward)

        return Forward()


@asynccontextmanager
async def proxied(q: Quotad, tls: grpc.ServerCredentials | None = None) -> AsyncIterator[tuple[Proxy, int]]:
    upstream = grpc.aio.insecure_channel(f"127.0.0.1:{q.port}")
    proxy = Proxy(upstream)
    server = grpc.aio.server()
    server.add_generic_rpc_handlers((proxy.handler(),))
    if tls is None:
        port = server.add_insecure_port("127.0.0.1:0")
    else:
        port = server.add_secure_port("127.0.0.1:0", tls)
    await server.start()
    try:
        yield proxy, port
    finally:
        await server.stop(0)
        await upstream.close()


async def test_reserve_commits_the_openai_usage_on_exit(quotad: QuotadFactory) -> None:
    async with quotad(POLICY) as q, client_for(q) as quota:
        async with quota.reserve("alice", model=MODEL, input_tokens=300, max_output_tokens=200) as r:
            assert r.response.decision == pb.DECISION_ALLOWED
            during = remaining(await quota.get_usage("alice", model=MODEL))
            usage = SimpleNamespace(
                prompt_tokens=300,
                completion_tokens=20,
                prompt_tokens_details=SimpleNamespace(cached_tokens=0),
            )
            r.record(usage)
        after = remaining(await quota.get_usage("alice", model=MODEL))

    assert during == {"tokens-per-day": 500, "in-flight": 1}
    assert after == {"tokens-per-day": 680, "in-flight": 2}  # 320 charged, slot free


async def test_reserve_commits_anthropic_usage_without_cache_reads(quotad: QuotadFactory) -> None:
    anthropic_usage = SimpleNamespace(
        input_tokens=100, output_tokens=50, cache_read_input_tokens=200, cache_creation_input_tokens=0
    )
    async with quotad(POLICY) as q, client_for(q) as quota:
        async with quota.reserve(
            "alice", model=MODEL, input_tokens=300, max_output_tokens=100, exclude_cached=True
        ) as r:
            r.record(anthropic_usage)
        assert remaining(await quota.get_usage("alice", model=MODEL))["tokens-per-day"] == 850


async def test_reserve_without_recorded_usage_commits_the_estimate(quotad: QuotadFactory) -> None:
    async with quotad(POLICY) as q, client_for(q) as quota:
        async with quota.reserve("alice", model=MODEL, input_tokens=100, max_output_tokens=100) as r:
            pass
        commit_again = await quota.commit(r.reservation_id, input_tokens=100, output_tokens=100)
        assert commit_again.repeat  # the exit committed it already
        assert remaining(await quota.get_usage("alice", model=MODEL)) == {
            "tokens-per-day": 800,
            "in-flight": 2,
        }


async def test_reserve_releases_when_the_body_raises(quotad: QuotadFactory) -> None:
    async with quotad(POLICY) as q, client_for(q) as quota:
        with pytest.raises(RuntimeError, match="LLM call failed"):
            async with quota.reserve("alice", model=MODEL, input_tokens=300, max_output_tokens=200) as r:
                raise RuntimeError("LLM call failed")
        assert remaining(await quota.get_usage("alice", model=MODEL)) == {
            "tokens-per-day": 1000,
            "in-flight": 2,
        }
        with pytest.raises(FailedPrecondition):
            await quota.commit(r.reservation_id, input_tokens=1, output_tokens=1)  # it was released


async def test_denied_reserve_raises_quota_denied_and_charges_nothing(quotad: QuotadFactory) -> None:
    async with quotad(POLICY) as q, client_for(q) as quota:
        first = await quota.check_and_reserve("alice", model=MODEL, input_tokens=600, max_output_tokens=100)
        assert first.decision == pb.DECISION_ALLOWED

        denial = await quota.check_and_reserve("alice", model=MODEL, input_tokens=300, max_output_tokens=100)
        assert denial.decision == pb.DECISION_DENIED  # a value from check_and_reserve
        with pytest.raises(QuotaDenied) as info:
            async with quota.reserve("alice", model=MODEL, input_tokens=300, max_output_tokens=100):
                pytest.fail("the body must not run")

        assert info.value.binding_limit == "tokens-per-day"
        assert info.value.reason == pb.DENY_REASON_LIMIT_EXCEEDED
        assert info.value.retry_after is not None
        assert info.value.retry_after.total_seconds() > 0
        assert "tokens-per-day" in str(info.value)
        assert remaining(await quota.get_usage("alice", model=MODEL))["tokens-per-day"] == 300


async def test_reserve_waits_out_a_short_denial_within_max_wait(quotad: QuotadFactory) -> None:
    async with quotad(POLICY) as q, client_for(q) as quota:
        await quota.check_and_reserve("bob", tier="burst", model=MODEL)
        started = time.monotonic()
        async with quota.reserve("bob", tier="burst", model=MODEL, max_wait=5) as r:
            waited = time.monotonic() - started
        assert r.response.decision == pb.DECISION_ALLOWED
        assert 0.05 < waited < 2  # about the 300 ms window, not the whole max_wait

        await quota.check_and_reserve("bob", tier="burst", model=MODEL)
        with pytest.raises(QuotaDenied):  # retry_after (~300 ms) is longer than max_wait
            async with quota.reserve("bob", tier="burst", model=MODEL, max_wait=0.01):
                pass


async def test_a_request_that_never_fits_is_not_waited_for(quotad: QuotadFactory) -> None:
    async with quotad(POLICY) as q, client_for(q) as quota:
        started = time.monotonic()
        with pytest.raises(QuotaDenied) as info:
            async with quota.reserve("alice", model=MODEL, input_tokens=2000, max_wait=30):
                pass
        assert time.monotonic() - started < 2
        assert info.value.reason == pb.DENY_REASON_EXCEEDS_CAPACITY
        assert info.value.retry_after is None


async def test_invalid_argument_carries_the_field_violations(quotad: QuotadFactory) -> None:
    async with quotad(POLICY) as q, client_for(q) as quota:
        with pytest.raises(InvalidArgument) as info:
            await quota.check_and_reserve("alice", model="gpt-5-ultra", input_tokens=-1)
    fields = {v.field: v.description for v in info.value.field_violations}
    assert set(fields) == {"model", "input_tokens"}
    assert info.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert str(info.value).startswith("INVALID_ARGUMENT: ")
    assert "input_tokens" in str(info.value)


async def test_a_lost_answer_is_retried_with_the_same_idempotency_key(quotad: QuotadFactory) -> None:
    reserve = "/quotad.v1.QuotaService/CheckAndReserve"
    async with quotad(POLICY) as q, proxied(q) as (proxy, port):
        proxy.lose_answers[reserve] = 1
        async with QuotaClient(f"127.0.0.1:{port}", timeout=5, retry_backoff=0.01) as quota:
            response = await quota.check_and_reserve("alice", model=MODEL, input_tokens=100)
            usage = remaining(await quota.get_usage("alice", model=MODEL))

    keys = [metadata for method, metadata in proxy.calls if method == reserve]
    assert len(keys) == 2  # the first answer was lost, the retry got through
    assert response.decision == pb.DECISION_ALLOWED
    assert response.replayed  # the server recognised the retry ...
    assert usage == {"tokens-per-day": 900, "in-flight": 1}  # ... and reserved once


async def test_unavailable_after_the_retries_is_an_unavailable_error(quotad: QuotadFactory) -> None:
    release = "/quotad.v1.QuotaService/Release"
    async with quotad(POLICY) as q, proxied(q) as (proxy, port):
        proxy.lose_answers[release] = 3
        async with QuotaClient(f"127.0.0.1:{port}", timeout=5, retries=2, retry_backoff=0.01) as quota:
            allowed = await quota.check_and_reserve("alice", model=MODEL)
            with pytest.raises(Unavailable, match="answer lost"):
                await quota.release(allowed.reservation_id)
    assert [method for method, _ in proxy.calls].count(release) == 3


async def test_metadata_and_the_metadata_hook_reach_the_server(quotad: QuotadFactory) -> None:
    tokens = iter(["token-1", "token-2"])
    async with (
        quotad(POLICY) as q,
        proxied(q) as (proxy, port),
        QuotaClient(
            f"127.0.0.1:{port}",
            metadata=[("x-team", "search")],
            metadata_provider=lambda: [("authorization", f"Bearer {next(tokens)}")],
            options=[("grpc.primary_user_agent", "quotad-test")],
        ) as quota,
    ):
        await quota.get_usage("alice", model=MODEL)
        await quota.get_usage("alice", model=MODEL)
    sent = [metadata for _, metadata in proxy.calls]
    assert [m["authorization"] for m in sent] == ["Bearer token-1", "Bearer token-2"]
    assert all(m["x-team"] == "search" for m in sent)
    assert sent[0]["user-agent"].startswith("quotad-test")


@pytest.fixture(scope="module")
def certificate(tmp_path_factory: pytest.TempPathFactory) -> tuple[bytes, bytes]:
    """A self-signed certificate for localhost (and its key), made by openssl."""
    directory = tmp_path_factory.mktemp("tls")
    key, cert = directory / "key.pem", directory / "cert.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
         "-nodes", "-days", "1", "-subj", "/CN=localhost", "-addext", "subjectAltName=DNS:localhost",
         "-keyout", str(key), "-out", str(cert)],
        check=True,
        capture_output=True,
    )  # fmt: skip
    return key.read_bytes(), cert.read_bytes()


async def test_tls_credentials_are_used(quotad: QuotadFactory, certificate: tuple[bytes, bytes]) -> None:
    key, cert = certificate
    tls = grpc.ssl_server_credentials([(key, cert)])
    async with quotad(POLICY) as q, proxied(q, tls) as (proxy, port):
        trusted = grpc.ssl_channel_credentials(root_certificates=cert)
        async with QuotaClient(f"localhost:{port}", credentials=trusted, timeout=5) as quota:
            allowed = await quota.check_and_reserve("frank", model=MODEL)
        async with QuotaClient(f"localhost:{port}", timeout=1, retries=0) as plaintext:
            with pytest.raises(Unavailable):
                await plaintext.get_usage("frank", model=MODEL)
    assert allowed.decision == pb.DECISION_ALLOWED
    assert [method for method, _ in proxy.calls] == ["/quotad.v1.QuotaService/CheckAndReserve"]


async def test_sync_client_reserves_commits_and_releases(quotad: QuotadFactory) -> None:
    async with quotad(POLICY) as q:
        # The blocking client runs in a thread: this event loop is serving quotad.
        def use_sync_client() -> tuple[dict[str, int], type[BaseException] | None, str]:
            with SyncQuotaClient(f"127.0.0.1:{q.port}", timeout=5) as quota:
                with quota.reserve("carol", model=MODEL, input_tokens=200, max_output_tokens=100) as r:
                    r.record({"prompt_tokens": 200, "completion_tokens": 10})
                try:
                    with quota.reserve("carol", model=MODEL, input_tokens=100):
                        raise KeyError("boom")
                except KeyError:
                    pass
                denied: type[BaseException] | None = None
                try:
                    with quota.reserve("carol", model=MODEL, input_tokens=5000):
                        pass
                except QuotaDenied as error:
                    denied = type(error)
                try:
                    quota.get_usage("")
                except InvalidArgument as error:
                    invalid = ",".join(v.field for v in error.field_violations)
                return remaining(quota.get_usage("carol", model=MODEL)), denied, invalid

        usage, denied, invalid = await asyncio.to_thread(use_sync_client)
    assert usage == {"tokens-per-day": 790, "in-flight": 2}
    assert denied is QuotaDenied
    assert invalid == "subject"


async def test_sync_client_retries_a_lost_answer(quotad: QuotadFactory) -> None:
    reserve = "/quotad.v1.QuotaService/CheckAndReserve"
    async with quotad(POLICY) as q, proxied(q) as (proxy, port):
        proxy.lose_answers[reserve] = 1

        def reserve_once() -> pb.CheckAndReserveResponse:
            with SyncQuotaClient(f"127.0.0.1:{port}", timeout=5, retry_backoff=0.01) as quota:
                return quota.check_and_reserve("dave", model=MODEL, input_tokens=100)

        response = await asyncio.to_thread(reserve_once)
        async with client_for(q) as quota:
            usage = remaining(await quota.get_usage("dave", model=MODEL))
    assert response.replayed
    assert usage == {"tokens-per-day": 900, "in-flight": 1}


async def test_the_body_can_settle_itself(quotad: QuotadFactory) -> None:
    async with quotad(POLICY) as q, client_for(q) as quota:
        async with quota.reserve("erin", model=MODEL, input_tokens=100) as r:
            committed = await r.commit(input_tokens=50, output_tokens=0)
        async with quota.reserve("erin", model=MODEL, input_tokens=100) as r:
            released = await r.release()
        usage = remaining(await quota.get_usage("erin", model=MODEL))
    assert not committed.repeat
    assert not released.repeat  # and neither exit settled again (that would raise)
    assert usage == {"tokens-per-day": 950, "in-flight": 2}


async def test_priority_and_server_side_waiting_through_the_client(quotad: QuotadFactory) -> None:
    policy = """
        defaults: {tier: t}
        admission: {low: 0.5}
        tiers: {t: {limits: []}}
        global:
          limits:
            - {name: slots, metric: concurrent, limit: 2}
    """
    async with quotad(policy) as q, QuotaClient(f"127.0.0.1:{q.port}") as client:
        first = await client.check_and_reserve("a", priority=pb.PRIORITY_LOW)
        assert first.priority == pb.PRIORITY_LOW
        assert (await client.check_and_reserve("b", priority=pb.PRIORITY_LOW)).decision == pb.DECISION_DENIED
        high = await client.check_and_reserve("c", priority=pb.PRIORITY_HIGH)
        assert high.decision == pb.DECISION_ALLOWED
        waiting = asyncio.ensure_future(
            client.check_and_reserve("d", priority=pb.PRIORITY_HIGH, server_wait=timedelta(seconds=5))
        )
        await asyncio.sleep(0.2)
        await client.release(first.reservation_id)
        admitted = await waiting
        assert admitted.decision == pb.DECISION_ALLOWED
        assert admitted.waited.ToTimedelta() > timedelta(0)


async def test_reserve_context_manager_takes_a_priority(quotad: QuotadFactory) -> None:
    policy = """
        defaults: {tier: t}
        admission: {low: 0.5}
        tiers: {t: {limits: []}}
        global:
          limits:
            - {name: tokens, metric: input_tokens, limit: 100, period: 1d}
    """
    async with quotad(policy) as q, QuotaClient(f"127.0.0.1:{q.port}") as client:
        with pytest.raises(QuotaDenied):
            async with client.reserve("a", input_tokens=60, priority=pb.PRIORITY_LOW):
                pass  # 60 is more than LOW's half of the limit
        async with client.reserve("a", input_tokens=60, priority=pb.PRIORITY_HIGH) as held:
            assert held.response.priority == pb.PRIORITY_HIGH
            held.record(input_tokens=60, output_tokens=0)

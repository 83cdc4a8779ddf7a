"""The Python SDK (`quotad.QuotaClient`, `quotad.SyncQuotaClient`) against a live quotad.

Real Valkey, real gRPC over loopback, Redis's own clock. Where a test needs the network
to misbehave (a lost answer) or to see what reaches the server (metadata), a real gRPC
proxy sits between the client and quotad and forwards raw bytes.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import timedelta
from types import SimpleNamespace
from typing import Any, TypeVar

import anthropic.types as anthropic
import grpc
import openai.types.chat as openai_chat
import openai.types.responses as openai_responses
import pytest
import redis.asyncio as aioredis
from openai.types import CompletionUsage
from openai.types.chat.chat_completion_chunk import Choice, ChoiceDelta
from openai.types.completion_usage import PromptTokensDetails
from openai.types.responses.response_usage import InputTokensDetails, OutputTokensDetails
from quotad import (
    FailedPrecondition,
    InvalidArgument,
    QuotaClient,
    QuotaDenied,
    SyncQuotaClient,
    Unavailable,
    Usage,
    pb,
)
from quotad._common import Attempts, Settings
from quotad_server.store.embedded import EmbeddedRedis

from tests.conftest import Quotad, QuotadFactory, running_quotad

T = TypeVar("T")

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
            response = await quota.check_and_reserve(
                "alice", model=MODEL, input_tokens=100, max_output_tokens=100
            )
            usage = remaining(await quota.get_usage("alice", model=MODEL))

    keys = [metadata for method, metadata in proxy.calls if method == reserve]
    assert len(keys) == 2  # the first answer was lost, the retry got through
    assert response.decision == pb.DECISION_ALLOWED
    assert response.replayed  # the server recognised the retry ...
    assert usage == {"tokens-per-day": 800, "in-flight": 1}  # ... and reserved once


async def test_unavailable_after_the_retries_is_an_unavailable_error(quotad: QuotadFactory) -> None:
    release = "/quotad.v1.QuotaService/Release"
    async with quotad(POLICY) as q, proxied(q) as (proxy, port):
        proxy.lose_answers[release] = 3
        async with QuotaClient(f"127.0.0.1:{port}", timeout=5, retries=2, retry_backoff=0.01) as quota:
            allowed = await quota.check_and_reserve("alice", model=MODEL, max_output_tokens=100)
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
            allowed = await quota.check_and_reserve("frank", model=MODEL, max_output_tokens=100)
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
                    with quota.reserve("carol", model=MODEL, input_tokens=100, max_output_tokens=100):
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
                return quota.check_and_reserve("dave", model=MODEL, input_tokens=100, max_output_tokens=100)

        response = await asyncio.to_thread(reserve_once)
        async with client_for(q) as quota:
            usage = remaining(await quota.get_usage("dave", model=MODEL))
    assert response.replayed
    assert usage == {"tokens-per-day": 800, "in-flight": 1}


async def test_the_body_can_settle_itself(quotad: QuotadFactory) -> None:
    async with quotad(POLICY) as q, client_for(q) as quota:
        async with quota.reserve("erin", model=MODEL, input_tokens=100, max_output_tokens=100) as r:
            committed = await r.commit(input_tokens=50, output_tokens=0)
        async with quota.reserve("erin", model=MODEL, input_tokens=100, max_output_tokens=100) as r:
            released = await r.release()
        usage = remaining(await quota.get_usage("erin", model=MODEL))
    assert not committed.repeat
    assert not released.repeat  # and neither exit settled again (that would raise)
    assert usage == {"tokens-per-day": 950, "in-flight": 2}


async def until_waiting_in_line(redis_client: aioredis.Redis, call: asyncio.Future[Any]) -> None:
    """Until a request waits in a line (a `...:q` sorted set in Redis); fail if `call` ends first."""

    async def waiting() -> int:
        return sum([await redis_client.zcard(line) for line in await redis_client.keys("*:q")])

    deadline = time.monotonic() + 30
    while await waiting() == 0:
        if call.done():
            pytest.fail(f"the call ended before it waited in line: {call.result()!r}")
        assert time.monotonic() < deadline, "no request waited in line within 30 s"
        await asyncio.sleep(0.01)


async def test_priority_and_server_side_waiting_through_the_client(
    quotad: QuotadFactory, redis_client: aioredis.Redis
) -> None:
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
        await until_waiting_in_line(redis_client, waiting)
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


# -- what the body recorded is committed, even when the body then raises ---------------------


def answer_then_fail(record: Callable[..., None]) -> None:
    """A reservation's body: the LLM answered (400 in, 50 out), then handling its answer failed."""
    record({"prompt_tokens": 400, "completion_tokens": 50})
    raise RuntimeError("parsing the answer failed")


async def test_usage_recorded_before_the_body_raises_is_committed(quotad: QuotadFactory) -> None:
    """The LLM answered (450 tokens), then the body failed: those tokens were spent."""
    async with quotad(POLICY) as q, client_for(q) as quota:
        with pytest.raises(RuntimeError, match="parsing the answer failed"):
            async with quota.reserve("alice", model=MODEL, input_tokens=300, max_output_tokens=200) as r:
                answer_then_fail(r.record)
        commit_again = await quota.commit(r.reservation_id, input_tokens=400, output_tokens=50)
        usage = remaining(await quota.get_usage("alice", model=MODEL))
    assert commit_again.repeat  # the exit committed it
    assert usage == {"tokens-per-day": 550, "in-flight": 2}


async def test_sync_reserve_commits_what_was_recorded_when_the_body_raises(quotad: QuotadFactory) -> None:
    async with quotad(POLICY) as q:

        def use_sync_client() -> dict[str, int]:
            with SyncQuotaClient(f"127.0.0.1:{q.port}", timeout=5) as quota:
                with (
                    pytest.raises(RuntimeError, match="parsing the answer failed"),
                    quota.reserve("alice", model=MODEL, input_tokens=300, max_output_tokens=200) as r,
                ):
                    answer_then_fail(r.record)
                return remaining(quota.get_usage("alice", model=MODEL))

        assert await asyncio.to_thread(use_sync_client) == {"tokens-per-day": 550, "in-flight": 2}


# -- usage as the provider SDKs return it: the real openai and anthropic types, no network -------
#
# Every case is one call that used 400 prompt tokens (some read from the prompt cache) and 50
# output tokens, reported the way that SDK reports it, whole or as a stream's events.


def _chat_usage() -> CompletionUsage:
    return CompletionUsage(
        prompt_tokens=400,
        completion_tokens=50,
        total_tokens=450,
        prompt_tokens_details=PromptTokensDetails(cached_tokens=256),
    )


def _chat_chunk(usage: CompletionUsage | None = None, text: str = "") -> openai_chat.ChatCompletionChunk:
    choices = [] if usage is not None else [Choice(index=0, delta=ChoiceDelta(content=text))]
    return openai_chat.ChatCompletionChunk(
        id="chatcmpl-1",
        choices=choices,
        created=0,
        model="gpt-4o",
        object="chat.completion.chunk",
        usage=usage,
    )


def _responses_usage() -> openai_responses.ResponseUsage:
    return openai_responses.ResponseUsage(
        input_tokens=400,
        input_tokens_details=InputTokensDetails(cached_tokens=256, cache_write_tokens=0),
        output_tokens=50,
        output_tokens_details=OutputTokensDetails(reasoning_tokens=10),
        total_tokens=450,
    )


def _response(usage: openai_responses.ResponseUsage | None) -> openai_responses.Response:
    return openai_responses.Response(
        id="resp_1",
        created_at=0,
        model="gpt-4o",
        object="response",
        output=[],
        parallel_tool_calls=True,
        tool_choice="auto",
        tools=[],
        usage=usage,
    )


def _anthropic_usage(output_tokens: int = 50) -> anthropic.Usage:
    return anthropic.Usage(
        input_tokens=50,  # Anthropic reports the cache reads and writes beside it
        cache_read_input_tokens=200,
        cache_creation_input_tokens=150,
        output_tokens=output_tokens,
    )


def _anthropic_message(usage: anthropic.Usage) -> anthropic.Message:
    return anthropic.Message(
        id="msg_1",
        type="message",
        role="assistant",
        model="claude-sonnet-4-5",
        content=[anthropic.TextBlock(type="text", text="Hello")],
        stop_reason="end_turn",
        stop_sequence=None,
        usage=usage,
    )


def _anthropic_stream(delta_usage: anthropic.MessageDeltaUsage) -> list[object]:
    """The events of `client.messages.create(..., stream=True)`, in order."""
    return [
        anthropic.RawMessageStartEvent(
            type="message_start", message=_anthropic_message(_anthropic_usage(output_tokens=1))
        ),
        anthropic.RawContentBlockStartEvent(
            type="content_block_start", index=0, content_block=anthropic.TextBlock(type="text", text="")
        ),
        anthropic.RawContentBlockDeltaEvent(
            type="content_block_delta", index=0, delta=anthropic.TextDelta(type="text_delta", text="Hello")
        ),
        anthropic.RawContentBlockStopEvent(type="content_block_stop", index=0),
        anthropic.RawMessageDeltaEvent(
            type="message_delta",
            delta=anthropic.raw_message_delta_event.Delta(stop_reason="end_turn", stop_sequence=None),
            usage=delta_usage,
        ),
        anthropic.RawMessageStopEvent(type="message_stop"),
    ]


OPENAI_USED = Usage(input_tokens=400, output_tokens=50, cached_input_tokens=256)
ANTHROPIC_USED = Usage(
    input_tokens=400, output_tokens=50, cached_input_tokens=200, cache_write_input_tokens=150
)

PROVIDER_REPORTS = [
    pytest.param([_chat_usage()], OPENAI_USED, id="openai-chat-usage"),
    pytest.param(
        [
            openai_chat.ChatCompletion(
                id="chatcmpl-1",
                choices=[],
                created=0,
                model="gpt-4o",
                object="chat.completion",
                usage=_chat_usage(),
            )
        ],
        OPENAI_USED,
        id="openai-chat-completion",
    ),
    pytest.param(
        [_chat_chunk(text="Hel"), _chat_chunk(text="lo"), _chat_chunk(usage=_chat_usage())],
        OPENAI_USED,
        id="openai-chat-stream-include-usage",
    ),
    pytest.param([_responses_usage()], OPENAI_USED, id="openai-responses-usage"),
    pytest.param([_response(_responses_usage())], OPENAI_USED, id="openai-response"),
    pytest.param(
        [
            openai_responses.ResponseCreatedEvent(
                type="response.created", sequence_number=0, response=_response(None)
            ),
            openai_responses.ResponseTextDeltaEvent(
                type="response.output_text.delta",
                sequence_number=1,
                item_id="msg_1",
                output_index=0,
                content_index=0,
                delta="Hello",
                logprobs=[],
            ),
            openai_responses.ResponseCompletedEvent(
                type="response.completed", sequence_number=2, response=_response(_responses_usage())
            ),
        ],
        OPENAI_USED,
        id="openai-responses-stream",
    ),
    pytest.param([_anthropic_usage()], ANTHROPIC_USED, id="anthropic-usage"),
    pytest.param([_anthropic_message(_anthropic_usage())], ANTHROPIC_USED, id="anthropic-message"),
    pytest.param(
        _anthropic_stream(anthropic.MessageDeltaUsage(output_tokens=50)),
        ANTHROPIC_USED,
        id="anthropic-stream",
    ),
    pytest.param(
        _anthropic_stream(  # newer API versions repeat the (cumulative) input counts in message_delta
            anthropic.MessageDeltaUsage(
                input_tokens=50,
                cache_read_input_tokens=200,
                cache_creation_input_tokens=150,
                output_tokens=50,
            )
        ),
        ANTHROPIC_USED,
        id="anthropic-stream-cumulative-delta",
    ),
]


@pytest.mark.parametrize(("reports", "used"), PROVIDER_REPORTS)
def test_usage_of_reads_each_provider_type(reports: list[object], used: Usage) -> None:
    assert Usage.of(*reports) == used


@pytest.mark.parametrize(("reports", "used"), PROVIDER_REPORTS)
async def test_reserve_commits_what_each_provider_type_reports(
    quotad: QuotadFactory, reports: list[object], used: Usage
) -> None:
    """Each report recorded as it arrives, as a stream loop would; the exit commits the call's usage."""
    async with quotad(POLICY) as q, client_for(q) as quota:
        async with quota.reserve("alice", model=MODEL, input_tokens=300, max_output_tokens=200) as r:
            for report in reports:
                r.record(report)
        commit_again = await quota.commit(r.reservation_id, used)
        usage = remaining(await quota.get_usage("alice", model=MODEL))
    assert commit_again.repeat  # ... and committed exactly that on exit
    assert (commit_again.committed.input_tokens, commit_again.committed.output_tokens) == (400, 50)
    assert commit_again.committed.cached_input_tokens == used.cached_input_tokens
    assert usage == {"tokens-per-day": 550, "in-flight": 2}


async def test_a_message_delta_without_its_message_start_keeps_the_input_estimate(
    quotad: QuotadFactory,
) -> None:
    """The stream's input tokens were never seen: the reserved estimate (300) stands in for them."""
    delta = anthropic.RawMessageDeltaEvent(
        type="message_delta",
        delta=anthropic.raw_message_delta_event.Delta(stop_reason="end_turn", stop_sequence=None),
        usage=anthropic.MessageDeltaUsage(output_tokens=50),
    )
    with pytest.raises(TypeError, match="no complete token usage"):
        Usage.of(delta)
    async with quotad(POLICY) as q, client_for(q) as quota:
        async with quota.reserve("alice", model=MODEL, input_tokens=300, max_output_tokens=200) as r:
            r.record(delta)
        usage = remaining(await quota.get_usage("alice", model=MODEL))
    assert usage == {"tokens-per-day": 650, "in-flight": 2}


def stream_then_fail(events: list[object], record: Callable[[object], None]) -> None:
    for event in events:
        record(event)
    raise ConnectionError("the stream was cut")


async def test_an_anthropic_stream_that_fails_midway_commits_what_it_reported(quotad: QuotadFactory) -> None:
    """message_start said 400 in; the stream broke before message_delta: the output estimate stands."""
    events = _anthropic_stream(anthropic.MessageDeltaUsage(output_tokens=50))
    async with quotad(POLICY) as q, client_for(q) as quota:
        with pytest.raises(ConnectionError):
            async with quota.reserve("alice", model=MODEL, input_tokens=300, max_output_tokens=200) as r:
                stream_then_fail(events[:3], r.record)
        usage = remaining(await quota.get_usage("alice", model=MODEL))
    assert usage == {"tokens-per-day": 1000 - 400 - 1, "in-flight": 2}  # message_start's first output token


# -- retries: one deadline for all attempts, the same idempotency key, a real Redis outage ----------


def test_retries_back_off_with_jitter_until_the_deadline() -> None:
    """Attempts of 250 ms (quotad's Redis timeout) against a 2 s deadline: five, then give up."""
    now = 100.0
    attempts = Attempts(Settings(timeout_s=2.0), 2.0, clock=lambda: now)
    timeouts: list[float] = []
    delays: list[float] = []
    while True:
        timeouts.append(attempts.timeout())
        now += 0.25  # the attempt, answered UNAVAILABLE
        delay = attempts.delay_before_retry(grpc.StatusCode.UNAVAILABLE)
        if delay is None:
            break
        delays.append(delay)
        now += delay
    assert attempts.made == 5
    assert timeouts[0] == 2.0
    assert timeouts == sorted(timeouts, reverse=True)  # each attempt gets what is left, no more
    for retry, delay in enumerate(delays):
        backoff = min(0.05 * 2**retry, 1.0)
        assert backoff / 2 <= delay <= backoff


def test_only_unavailable_is_retried_and_retries_can_be_capped() -> None:
    uncapped = Attempts(Settings(), 2.0)
    assert uncapped.delay_before_retry(grpc.StatusCode.DEADLINE_EXCEEDED) is None
    assert uncapped.delay_before_retry(grpc.StatusCode.INVALID_ARGUMENT) is None
    capped = Attempts(Settings(retries=2), 60.0)
    answers = [capped.delay_before_retry(grpc.StatusCode.UNAVAILABLE) for _ in range(3)]
    assert [delay is not None for delay in answers] == [True, True, False]


@dataclass(frozen=True)
class Attempt:
    """One attempt as a client interceptor saw it."""

    method: str
    code: grpc.StatusCode
    timeout: float | None
    idempotency_key: str


class AttemptLog:
    """Every attempt a client makes: the client retries by calling again, so each one is seen."""

    def __init__(self) -> None:
        self.attempts: list[Attempt] = []

    def saw(
        self,
        details: grpc.ClientCallDetails | grpc.aio.ClientCallDetails,
        request: object,
        code: grpc.StatusCode,
    ) -> None:
        method = details.method.decode() if isinstance(details.method, bytes) else str(details.method)
        key = request.idempotency_key if isinstance(request, pb.CheckAndReserveRequest) else ""
        self.attempts.append(Attempt(method.rsplit("/", 1)[-1], code, details.timeout, key))

    def of(self, method: str) -> list[Attempt]:
        return [attempt for attempt in self.attempts if attempt.method == method]

    def answered_unavailable(self) -> bool:
        return any(attempt.code == grpc.StatusCode.UNAVAILABLE for attempt in self.attempts)


class AsyncAttemptLog(AttemptLog, grpc.aio.UnaryUnaryClientInterceptor):
    async def intercept_unary_unary(
        self, continuation: Callable[..., Any], client_call_details: grpc.aio.ClientCallDetails, request: Any
    ) -> Any:
        call = await continuation(client_call_details, request)
        self.saw(client_call_details, request, await call.code())
        return call


class SyncAttemptLog(AttemptLog, grpc.UnaryUnaryClientInterceptor):
    def intercept_unary_unary(
        self, continuation: Callable[..., Any], client_call_details: grpc.ClientCallDetails, request: Any
    ) -> Any:
        outcome = continuation(client_call_details, request)
        self.saw(client_call_details, request, outcome.code())
        return outcome


OUTAGE_DEADLINE_S = 60.0  # the call's deadline: far longer than any pause here; reached only if broken


@pytest.fixture
def own_redis() -> Iterator[EmbeddedRedis]:
    """A Valkey of the test's own, so pausing it leaves the session's alone."""
    with EmbeddedRedis() as server:
        yield server


@asynccontextmanager
async def paused(redis_server: EmbeddedRedis) -> AsyncIterator[None]:
    """Redis stopped (SIGSTOP) for the block: connections open, nothing answered. Always resumed."""
    assert redis_server.process is not None
    os.kill(redis_server.process.pid, signal.SIGSTOP)
    try:
        yield
    finally:
        os.kill(redis_server.process.pid, signal.SIGCONT)


async def until(condition: Callable[[], bool], what: str, call: Awaitable[object]) -> None:
    """Wait for `condition` (checked every 10 ms); fail if the call under test ends first."""
    call = asyncio.ensure_future(call)
    deadline = time.monotonic() + OUTAGE_DEADLINE_S
    while not condition():
        if call.done():
            pytest.fail(f"the call ended before {what}: {call.result()!r}")
        assert time.monotonic() < deadline, f"{what}: not within {OUTAGE_DEADLINE_S} s"
        await asyncio.sleep(0.01)


def assert_retried_through_and_reserved_once(
    log: AttemptLog, response: pb.CheckAndReserveResponse, usage: dict[str, int]
) -> None:
    reserves = log.of("CheckAndReserve")
    assert reserves[0].code == grpc.StatusCode.UNAVAILABLE  # Redis was paused: quotad could not decide
    assert reserves[-1].code == grpc.StatusCode.OK  # ... and a retry got through once it was back
    assert reserves[0].idempotency_key
    assert {attempt.idempotency_key for attempt in reserves} == {reserves[0].idempotency_key}
    timeouts = [attempt.timeout or 0.0 for attempt in reserves]
    assert timeouts == sorted(timeouts, reverse=True)  # one deadline shared by every attempt
    assert timeouts[0] <= OUTAGE_DEADLINE_S
    assert response.decision == pb.DECISION_ALLOWED
    # Exactly one reservation holds: 150 tokens and one slot (`replayed` says whether an attempt
    # that timed out had reserved after all; either way it counts once).
    assert usage == {"tokens-per-day": 850, "in-flight": 1}


async def test_reserve_retries_through_a_paused_redis_and_reserves_once(own_redis: EmbeddedRedis) -> None:
    async with running_quotad(POLICY, own_redis.url) as q:
        log = AsyncAttemptLog()
        address = f"127.0.0.1:{q.port}"
        channel = grpc.aio.insecure_channel(address, interceptors=[log])
        async with QuotaClient(address, channel=channel, timeout=OUTAGE_DEADLINE_S) as quota:
            async with paused(own_redis):
                reserving = asyncio.ensure_future(
                    quota.check_and_reserve("alice", model=MODEL, input_tokens=100, max_output_tokens=50)
                )
                await until(log.answered_unavailable, "quotad answered UNAVAILABLE", reserving)
            response = await reserving
            usage = remaining(await quota.get_usage("alice", model=MODEL))
    assert_retried_through_and_reserved_once(log, response, usage)


async def test_sync_reserve_retries_through_a_paused_redis_and_reserves_once(
    own_redis: EmbeddedRedis,
) -> None:
    async with running_quotad(POLICY, own_redis.url) as q:
        log = SyncAttemptLog()
        address = f"127.0.0.1:{q.port}"
        channel = grpc.intercept_channel(grpc.insecure_channel(address), log)
        with SyncQuotaClient(address, channel=channel, timeout=OUTAGE_DEADLINE_S) as quota:
            async with paused(own_redis):
                # A thread: this event loop serves quotad while the blocking client waits.
                reserving = asyncio.ensure_future(
                    asyncio.to_thread(
                        quota.check_and_reserve, "alice", model=MODEL, input_tokens=100, max_output_tokens=50
                    )
                )
                await until(log.answered_unavailable, "quotad answered UNAVAILABLE", reserving)
            response = await reserving
            usage = remaining(await asyncio.to_thread(quota.get_usage, "alice", model=MODEL))
    assert_retried_through_and_reserved_once(log, response, usage)


async def test_a_call_gives_up_at_its_deadline_however_many_attempts(own_redis: EmbeddedRedis) -> None:
    """Redis stays paused: UNAVAILABLE, and no attempt was given more than what was left."""
    async with running_quotad(POLICY, own_redis.url) as q:
        log = AsyncAttemptLog()
        address = f"127.0.0.1:{q.port}"
        channel = grpc.aio.insecure_channel(address, interceptors=[log])
        async with QuotaClient(address, channel=channel, timeout=1.5) as quota, paused(own_redis):
            with pytest.raises(Unavailable):
                await quota.check_and_reserve("alice", model=MODEL, input_tokens=100, max_output_tokens=100)
    timeouts = [attempt.timeout or 0.0 for attempt in log.of("CheckAndReserve")]
    assert timeouts
    assert timeouts[0] <= 1.5
    assert timeouts == sorted(timeouts, reverse=True)

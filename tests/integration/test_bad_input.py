"""Bad input: INVALID_ARGUMENT with field violations (or NOT_FOUND), fast, and nothing changed."""

from __future__ import annotations

import time
from typing import Any

import grpc
import pytest
import redis.asyncio as aioredis
from google.protobuf import duration_pb2
from google.rpc import error_details_pb2
from grpc_health.v1 import health_pb2
from grpc_reflection.v1alpha import reflection_pb2
from grpc_status import rpc_status
from quotad.v1 import quota_pb2 as pb

from tests.conftest import RPC_TIMEOUT_S, ManualClock, Quotad, QuotadFactory, rpc_error, snapshot

POLICY = """
    defaults: {tier: free}
    leases: {default: 30s, min: 1s, max: 10m}
    models: {gpt-4o: {}}
    tiers:
      free:
        limits:
          - {name: tpm, metric: total_tokens, limit: 1000, period: 1m}
          - {name: in-flight, metric: concurrent, limit: 2}
"""
GOOD: dict[str, Any] = {"subject": "alice", "model": "gpt-4o", "input_tokens": 10, "max_output_tokens": 10}


def violations(error: Any) -> dict[str, str]:
    status = rpc_status.from_call(error)
    assert status is not None, "INVALID_ARGUMENT must carry google.rpc.Status details"
    found: dict[str, str] = {}
    for detail in status.details:  # besides an ErrorInfo (tests/integration/test_error_details.py)
        bad_request = error_details_pb2.BadRequest()
        if not detail.Unpack(bad_request):
            continue
        found.update({v.field: v.description for v in bad_request.field_violations})
    return found


BAD_RESERVES = [
    pytest.param({"subject": ""}, "subject", id="empty-subject"),
    pytest.param({"subject": "a" * 257}, "subject", id="subject-over-256-bytes"),
    pytest.param({"subject": "é" * 129}, "subject", id="subject-over-256-bytes-utf8"),
    pytest.param({"subject": "al\nice"}, "subject", id="subject-control-char"),
    pytest.param({"subject": "al\x00ice"}, "subject", id="subject-nul"),
    pytest.param({"tenant": "t" * 300}, "tenant", id="tenant-too-long"),
    pytest.param({"tenant": "acme\x1b"}, "tenant", id="tenant-control-char"),
    pytest.param({"tier": "gold"}, "tier", id="unknown-tier"),
    pytest.param({"model": "gpt-5-ultra"}, "model", id="unknown-model"),
    pytest.param({"model": ""}, "model", id="missing-model"),
    pytest.param({"input_tokens": -1}, "input_tokens", id="negative-input"),
    pytest.param({"input_tokens": 10**9 + 1}, "input_tokens", id="absurd-input"),
    pytest.param({"max_output_tokens": -5}, "max_output_tokens", id="negative-output"),
    pytest.param({"max_output_tokens": 2**62}, "max_output_tokens", id="absurd-output"),
    pytest.param({"lease": duration_pb2.Duration(nanos=500_000_000)}, "lease", id="lease-below-min"),
    pytest.param({"lease": duration_pb2.Duration(seconds=3600)}, "lease", id="lease-above-max"),
    pytest.param({"lease": duration_pb2.Duration(seconds=-5)}, "lease", id="lease-negative"),
    pytest.param({"idempotency_key": "k" * 257}, "idempotency_key", id="idempotency-key-too-long"),
]


@pytest.mark.parametrize(("change", "field"), BAD_RESERVES)
async def test_bad_reserve_is_refused_and_changes_nothing(
    quotad: QuotadFactory, redis_client: aioredis.Redis, change: dict[str, Any], field: str
) -> None:
    async with quotad(POLICY, clock=ManualClock()) as q:
        await q.reserve(**GOOD)  # some state to keep intact
        before = await snapshot(redis_client)
        started = time.monotonic()

        error = await rpc_error(q.reserve(**{**GOOD, **change}))

        assert time.monotonic() - started < 2
        assert error.code().name == "INVALID_ARGUMENT"
        assert field in violations(error), error.details()
        assert await snapshot(redis_client) == before


async def test_every_violation_is_reported_at_once(quotad: QuotadFactory) -> None:
    async with quotad(POLICY, clock=ManualClock()) as q:
        error = await rpc_error(q.reserve(subject="", tier="gold", model="x", input_tokens=-1))
        assert set(violations(error)) == {"subject", "tier", "model", "input_tokens"}
        assert "unknown tier 'gold'; the policy has: free" in violations(error)["tier"]


async def _reserved(q: Quotad) -> str:
    response = await q.reserve(**GOOD)
    assert response.decision == pb.DECISION_ALLOWED
    return response.reservation_id


BAD_IDS = [
    pytest.param("", id="empty"),
    pytest.param("not-a-reservation", id="not-hex"),
    pytest.param("a" * 41, id="too-long"),
    pytest.param("a" * 300, id="over-256-bytes"),
    pytest.param("a" * 39 + "\n", id="control-char"),
    pytest.param("A" * 40, id="upper-case"),
]


@pytest.mark.parametrize("reservation_id", BAD_IDS)
async def test_malformed_reservation_ids_are_invalid(
    quotad: QuotadFactory, redis_client: aioredis.Redis, reservation_id: str
) -> None:
    async with quotad(POLICY, clock=ManualClock()) as q:
        await _reserved(q)
        before = await snapshot(redis_client)
        for call in (q.commit(reservation_id, 1, 1), q.release(reservation_id)):
            error = await rpc_error(call)
            assert error.code().name == "INVALID_ARGUMENT"
            assert "reservation_id" in violations(error)
        assert await snapshot(redis_client) == before


@pytest.mark.parametrize(
    ("input_tokens", "output_tokens", "field"),
    [(-1, 0, "input_tokens"), (0, -1, "output_tokens"), (10**9 + 1, 0, "input_tokens")],
)
async def test_bad_commit_usage_is_invalid_and_changes_nothing(
    quotad: QuotadFactory, redis_client: aioredis.Redis, input_tokens: int, output_tokens: int, field: str
) -> None:
    async with quotad(POLICY, clock=ManualClock()) as q:
        reservation_id = await _reserved(q)
        before = await snapshot(redis_client)
        error = await rpc_error(q.commit(reservation_id, input_tokens, output_tokens))
        assert error.code().name == "INVALID_ARGUMENT"
        assert field in violations(error)
        assert await snapshot(redis_client) == before
        # The reservation is still there to commit properly.
        assert not (await q.commit(reservation_id, 5, 5)).repeat


async def test_unknown_reservation_is_not_found(quotad: QuotadFactory, redis_client: aioredis.Redis) -> None:
    async with quotad(POLICY, clock=ManualClock()) as q:
        reservation_id = await _reserved(q)
        before = await snapshot(redis_client)
        unknown = reservation_id[:8] + "0" * 32  # right shape, right partition, never issued
        assert (await rpc_error(q.commit(unknown, 1, 1))).code().name == "NOT_FOUND"
        assert (await rpc_error(q.release(unknown))).code().name == "NOT_FOUND"
        assert await snapshot(redis_client) == before


async def test_bad_usage_query_is_invalid(quotad: QuotadFactory) -> None:
    async with quotad(POLICY, clock=ManualClock()) as q:
        error = await rpc_error(q.stub.GetUsage(pb.GetUsageRequest(subject="", tier="gold"), timeout=5))
        assert error.code().name == "INVALID_ARGUMENT"
        assert set(violations(error)) == {"subject", "tier"}


# -- what only the wire can get wrong -------------------------------------------------

SERVICE = pb.DESCRIPTOR.services_by_name["QuotaService"]
CORRUPT = b"\x0a\x05ab"  # field 1 says 5 bytes follow; 2 do
BAD_UTF8 = b"\x0a\x03\xff\xfe\x41"  # field 1, a string in every request of QuotaService, is not UTF-8
INVALID = grpc.StatusCode.INVALID_ARGUMENT.value[0]


async def _unary(q: Quotad, path: str, body: bytes) -> bytes:
    call: grpc.aio.UnaryUnaryMultiCallable[bytes, bytes] = q.channel.unary_unary(path)
    return await call(body, timeout=RPC_TIMEOUT_S)


async def _stream(q: Quotad, path: str, bodies: list[bytes]) -> list[bytes]:
    call: grpc.aio.StreamStreamMultiCallable[bytes, bytes] = q.channel.stream_stream(path)
    return [answer async for answer in call(iter(bodies), timeout=RPC_TIMEOUT_S)]


@pytest.mark.parametrize(
    "body", [CORRUPT, BAD_UTF8, b"\xff" * 11], ids=["truncated", "bad-utf8", "bad-varint"]
)
@pytest.mark.parametrize("method", [m.name for m in SERVICE.methods if not m.client_streaming])
async def test_undecodable_body_is_invalid_on_every_unary_method(
    quotad: QuotadFactory, redis_client: aioredis.Redis, method: str, body: bytes
) -> None:
    async with quotad(POLICY, clock=ManualClock()) as q:
        await _reserved(q)
        before = await snapshot(redis_client)
        error = await rpc_error(_unary(q, f"/{SERVICE.full_name}/{method}", body))
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
        request_type = SERVICE.methods_by_name[method].input_type.full_name
        assert f"does not decode as {request_type}" in (error.details() or "")
        assert await snapshot(redis_client) == before


async def test_undecodable_stream_item_gets_an_error_in_its_place(quotad: QuotadFactory) -> None:
    """The stream goes on: the item is answered, in order, with no request_id (none could be read)."""
    async with quotad(POLICY, clock=ManualClock()) as q:
        reserve = pb.CheckAndReserveRequest(**GOOD)
        items = [pb.CheckAndReserveStreamRequest(request_id=f"r{i}", request=reserve) for i in range(2)]
        answers = [
            pb.CheckAndReserveStreamResponse.FromString(raw)
            for raw in await _stream(
                q,
                f"/{SERVICE.full_name}/CheckAndReserveStream",
                [items[0].SerializeToString(), BAD_UTF8, CORRUPT, items[1].SerializeToString()],
            )
        ]
        assert [a.request_id for a in answers] == ["r0", "", "", "r1"]
        assert [a.result.WhichOneof("outcome") for a in answers] == ["response", "error", "error", "response"]
        assert answers[1].result.error.code == INVALID
        assert "does not decode as quotad.v1.CheckAndReserveStreamRequest" in answers[1].result.error.message
        assert not answers[1].result.error.field_violations

        reservation_id = answers[0].result.response.reservation_id
        commit = pb.CommitStreamRequest(
            request_id="c", request=pb.CommitRequest(reservation_id=reservation_id)
        )
        raw = await _stream(q, f"/{SERVICE.full_name}/CommitStream", [CORRUPT, commit.SerializeToString()])
        commits = [pb.CommitStreamResponse.FromString(answer) for answer in raw]
        assert [c.request_id for c in commits] == ["", "c"]
        assert commits[0].result.error.code == INVALID
        assert commits[1].result.WhichOneof("outcome") == "response"


@pytest.mark.parametrize(
    "path",
    ["/grpc.health.v1.Health/Check", "/grpc.health.v1.Health/List", "/grpc.health.v1.Health/Watch"],
)
async def test_health_refuses_undecodable_bodies(quotad: QuotadFactory, path: str) -> None:
    async with quotad(POLICY) as q:
        call: grpc.aio.UnaryStreamMultiCallable[bytes, bytes] = q.channel.unary_stream(path)
        if path.endswith("Watch"):
            with pytest.raises(grpc.aio.AioRpcError) as info:
                async for _ in call(CORRUPT, timeout=RPC_TIMEOUT_S):
                    pass
            error = info.value
        else:
            error = await rpc_error(_unary(q, path, CORRUPT))
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, error.details()
        # and well-formed requests still get grpc's own answers
        known = {health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING}
        request = health_pb2.HealthCheckRequest(service=SERVICE.full_name).SerializeToString()
        answer = await _unary(q, "/grpc.health.v1.Health/Check", request)
        assert health_pb2.HealthCheckResponse.FromString(answer).status in known
        watching: grpc.aio.UnaryStreamMultiCallable[bytes, bytes] = q.channel.unary_stream(
            "/grpc.health.v1.Health/Watch"
        )
        watch = watching(request, timeout=RPC_TIMEOUT_S)
        first = await watch.read()
        assert isinstance(first, bytes)
        assert health_pb2.HealthCheckResponse.FromString(first).status in known
        watch.cancel()


async def test_reflection_refuses_undecodable_bodies(quotad: QuotadFactory) -> None:
    async with quotad(POLICY) as q:
        path = "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo"
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await _stream(q, path, [CORRUPT])
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        listing = reflection_pb2.ServerReflectionRequest(list_services="")
        (raw,) = await _stream(q, path, [listing.SerializeToString()])
        services = reflection_pb2.ServerReflectionResponse.FromString(raw).list_services_response.service
        assert SERVICE.full_name in {service.name for service in services}


BAD_DURATIONS = [  # google.protobuf.Duration's own rules: |nanos| < 1 s, one sign, +-10,000 years
    pytest.param((1, 2_000_000_000), "nanos", id="nanos-over-a-second"),
    pytest.param((5, -1), "same sign", id="positive-seconds-negative-nanos"),
    pytest.param((-5, 1), "same sign", id="negative-seconds-positive-nanos"),
    pytest.param((0, -1_000_000_000), "nanos", id="nanos-under-minus-a-second"),
    pytest.param((315_576_000_001, 0), "seconds", id="past-10000-years"),
    pytest.param((-(2**63), 0), "seconds", id="min-int64"),
]


@pytest.mark.parametrize(("duration", "problem"), BAD_DURATIONS)
@pytest.mark.parametrize("field", ["lease", "max_wait"])
async def test_invalid_durations_are_refused(
    quotad: QuotadFactory, redis_client: aioredis.Redis, field: str, duration: tuple[int, int], problem: str
) -> None:
    async with quotad(POLICY, clock=ManualClock()) as q:
        await q.reserve(**GOOD)
        before = await snapshot(redis_client)
        seconds, nanos = duration

        error = await rpc_error(
            q.reserve(**{**GOOD, field: duration_pb2.Duration(seconds=seconds, nanos=nanos)})
        )

        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "not a valid google.protobuf.Duration" in violations(error)[field]
        assert problem in violations(error)[field]
        assert await snapshot(redis_client) == before


async def test_wire_errors_in_a_batch_fail_only_their_item(quotad: QuotadFactory) -> None:
    async with quotad(POLICY, clock=ManualClock()) as q:
        bad_lease = pb.CheckAndReserveRequest(**GOOD, lease=duration_pb2.Duration(seconds=5, nanos=-1))
        bad_priority = pb.CheckAndReserveRequest(**GOOD, priority=7)  # type: ignore[arg-type]
        batch = pb.CheckAndReserveBatchRequest(
            requests=[bad_lease, pb.CheckAndReserveRequest(**GOOD), bad_priority]
        )
        response = await q.stub.CheckAndReserveBatch(batch, timeout=RPC_TIMEOUT_S)
        assert [r.WhichOneof("outcome") for r in response.results] == ["error", "response", "error"]
        assert [v.field for v in response.results[0].error.field_violations] == ["lease"]
        assert [v.field for v in response.results[2].error.field_violations] == ["priority"]
        assert response.results[1].response.decision == pb.DECISION_ALLOWED


def _bounded(message: str, found: list[tuple[str, str]], total: int) -> None:
    """At most 20 violations and one saying how many more there were; a message of at most 1 KB."""
    assert len(message.encode()) <= 1024
    assert len(found) == 21
    assert found[-1] == ("", f"{total - 20} more field violations left out")


@pytest.mark.parametrize("count", [1000, 60_000])
async def test_error_details_are_bounded(quotad: QuotadFactory, count: int) -> None:
    """Every empty chat message is a violation; a default client still gets INVALID_ARGUMENT."""
    async with quotad(POLICY, clock=ManualClock()) as q:
        request = {**GOOD, "input_tokens": 0, "messages": [pb.ChatMessage()] * count}
        error: Any = await rpc_error(q.reserve(**request))
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
        status = rpc_status.from_call(error)
        assert status is not None
        bad_request = error_details_pb2.BadRequest()
        assert [detail for detail in status.details if detail.Unpack(bad_request)]
        found = [(v.field, v.description) for v in bad_request.field_violations]
        _bounded(error.details() or "", found, count)
        assert found[0] == ("messages[0].role", "required")
        metadata = sum(len(key) + len(value) for key, value in error.trailing_metadata() or ())
        assert metadata < 4096


async def test_more_messages_than_a_prompt_can_hold_are_refused_at_once(quotad: QuotadFactory) -> None:
    """Each message counts for its framing (16 bytes) against the prompt's bound (1 MiB here):
    a body of 100,000 empty messages is refused as a whole, not message by message."""
    async with quotad(POLICY, clock=ManualClock()) as q:
        request = {**GOOD, "input_tokens": 0, "messages": [pb.ChatMessage()] * 100_000}
        error = await rpc_error(q.reserve(**request))
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert list(violations(error)) == ["messages"]
        assert "more than 65536 messages" in violations(error)["messages"]


async def test_long_values_in_errors_are_clipped(quotad: QuotadFactory) -> None:
    async with quotad(POLICY, clock=ManualClock()) as q:
        error = await rpc_error(q.reserve(**{**GOOD, "tier": "\u00e9" * 500_000}))  # 1 MB, echoed
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert len((error.details() or "").encode()) <= 1024
        tier = violations(error)["tier"]
        assert tier.startswith("unknown tier '\u00e9\u00e9")
        assert tier.endswith("\u2026")
        assert len(tier.encode()) <= 512


async def test_batch_and_stream_item_errors_are_bounded(quotad: QuotadFactory) -> None:
    async with quotad(POLICY, clock=ManualClock()) as q:
        many = pb.CheckAndReserveRequest(**{**GOOD, "input_tokens": 0}, messages=[pb.ChatMessage()] * 100)
        batch = pb.CheckAndReserveBatchRequest(requests=[many] * 1000)
        response = await q.stub.CheckAndReserveBatch(batch, timeout=RPC_TIMEOUT_S)
        assert len(response.results) == 1000
        for result in response.results:
            found = [(v.field, v.description) for v in result.error.field_violations]
            _bounded(result.error.message, found, 100)

        item = pb.CheckAndReserveStreamRequest(request_id="x", request=many).SerializeToString()
        (raw,) = await _stream(q, f"/{SERVICE.full_name}/CheckAndReserveStream", [item])
        error = pb.CheckAndReserveStreamResponse.FromString(raw).result.error
        _bounded(error.message, [(v.field, v.description) for v in error.field_violations], 100)

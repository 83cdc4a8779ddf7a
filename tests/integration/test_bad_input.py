"""Bad input: INVALID_ARGUMENT with field violations (or NOT_FOUND), fast, and nothing changed."""

from __future__ import annotations

import time
from typing import Any

import pytest
import redis.asyncio as aioredis
from google.protobuf import duration_pb2
from google.rpc import error_details_pb2
from grpc_status import rpc_status
from quotad.v1 import quota_pb2 as pb

from tests.conftest import ManualClock, Quotad, QuotadFactory, rpc_error, snapshot

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
    for detail in status.details:
        bad_request = error_details_pb2.BadRequest()
        assert detail.Unpack(bad_request)
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

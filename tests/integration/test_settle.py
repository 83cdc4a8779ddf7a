"""Commit and Release: exact reconciliation, idempotency, leases, late commits."""

from __future__ import annotations

import asyncio

import redis.asyncio as aioredis
from google.protobuf import duration_pb2
from quotad.v1 import quota_pb2 as pb

from tests.conftest import ManualClock, QuotadFactory, rpc_error, snapshot

POLICY = """
    defaults: {tier: free}
    leases: {default: 30s, min: 100ms, max: 10m}
    retention: 1h
    tiers:
      free:
        limits:
          - {name: rpm, metric: requests, limit: 10, period: 1m, algorithm: sliding_window}
          - {name: tpm, metric: total_tokens, limit: 1000, period: 1m}
          - {name: output-window, metric: output_tokens, limit: 500, period: 1m, algorithm: sliding_window}
          - {name: in-flight, metric: concurrent, limit: 2}
"""
FRESH = {"rpm": 10, "tpm": 1000, "output-window": 500, "in-flight": 2}


async def test_commit_below_estimate_refunds_exactly(quotad: QuotadFactory) -> None:
    async with quotad(POLICY, clock=ManualClock(), subject="alice") as q:
        reserved = await q.reserve(input_tokens=300, max_output_tokens=200)
        assert await q.usage() == {"rpm": 9, "tpm": 500, "output-window": 300, "in-flight": 1}

        committed = await q.commit(reserved.reservation_id, input_tokens=280, output_tokens=50)

        assert not committed.repeat
        assert (committed.committed.input_tokens, committed.committed.output_tokens) == (280, 50)
        assert (committed.reserved.input_tokens, committed.reserved.output_tokens) == (300, 200)
        assert await q.usage() == {"rpm": 9, "tpm": 1000 - 330, "output-window": 450, "in-flight": 2}


async def test_commit_above_estimate_charges_debt_that_later_requests_wait_out(quotad: QuotadFactory) -> None:
    clock = ManualClock()
    async with quotad(POLICY, clock=clock, subject="alice") as q:
        reserved = await q.reserve(input_tokens=100, max_output_tokens=100)
        await q.commit(reserved.reservation_id, input_tokens=100, output_tokens=1100)

        usage = await q.usage()
        assert usage["tpm"] == 1000 - 1200  # 200 of debt
        assert usage["output-window"] == 500 - 1100

        denied = await q.reserve(input_tokens=100)
        # The bucket must drain 300 (200 debt + 100) at 1000/60s = 18 s.
        assert denied.binding_limit == "output-window"  # the window holds the debt for a full minute
        tpm = next(s for s in denied.limits if s.name == "tpm")
        assert tpm.denied
        clock.advance(60)
        assert (await q.reserve(input_tokens=100)).decision == pb.DECISION_ALLOWED


async def test_commit_is_idempotent(quotad: QuotadFactory, redis_client: aioredis.Redis) -> None:
    async with quotad(POLICY, clock=ManualClock(), subject="alice") as q:
        reserved = await q.reserve(input_tokens=300, max_output_tokens=200)
        first = await q.commit(reserved.reservation_id, input_tokens=250, output_tokens=120)
        after_first = await snapshot(redis_client)

        retried = await asyncio.gather(
            *(q.commit(reserved.reservation_id, input_tokens=1, output_tokens=1) for _ in range(5))
        )

        for again in retried:
            assert again.repeat
            assert again.committed == first.committed
        assert await snapshot(redis_client) == after_first


async def test_release_refunds_everything_and_is_idempotent(
    quotad: QuotadFactory, redis_client: aioredis.Redis
) -> None:
    async with quotad(POLICY, clock=ManualClock(), subject="alice") as q:
        reserved = await q.reserve(input_tokens=300, max_output_tokens=200)

        released = await q.release(reserved.reservation_id)

        assert not released.repeat
        assert (released.refunded.input_tokens, released.refunded.output_tokens) == (300, 200)
        assert await q.usage() == FRESH
        after = await snapshot(redis_client)
        assert (await q.release(reserved.reservation_id)).repeat
        assert await snapshot(redis_client) == after


async def test_commit_after_release_and_release_after_commit_fail(quotad: QuotadFactory) -> None:
    async with quotad(POLICY, clock=ManualClock(), subject="alice") as q:
        released = await q.reserve(input_tokens=10)
        await q.release(released.reservation_id)
        error = await rpc_error(q.commit(released.reservation_id, input_tokens=10, output_tokens=0))
        assert error.code().name == "FAILED_PRECONDITION"
        assert "released" in (error.details() or "")

        committed = await q.reserve(input_tokens=10)
        await q.commit(committed.reservation_id, input_tokens=10, output_tokens=0)
        error = await rpc_error(q.release(committed.reservation_id))
        assert error.code().name == "FAILED_PRECONDITION"
        assert "committed" in (error.details() or "")


async def test_commit_racing_release_has_one_winner(quotad: QuotadFactory) -> None:
    async with quotad(POLICY, clock=ManualClock(), subject="alice") as q:
        for _ in range(5):
            reserved = await q.reserve(input_tokens=100, max_output_tokens=100)
            outcomes = await asyncio.gather(
                q.commit(reserved.reservation_id, input_tokens=100, output_tokens=100),
                q.release(reserved.reservation_id),
                return_exceptions=True,
            )
            assert sum(isinstance(o, Exception) for o in outcomes) == 1
        usage = await q.usage()
        assert usage["in-flight"] == 2


async def test_lease_expiry_frees_the_slot_without_traffic(quotad: QuotadFactory) -> None:
    clock = ManualClock()
    async with quotad(POLICY, clock=clock, subject="alice") as q:
        await q.reserve(input_tokens=100, lease=duration_pb2.Duration(seconds=5))
        await q.reserve(input_tokens=100, lease=duration_pb2.Duration(seconds=5))
        assert (await q.usage())["in-flight"] == 0

        clock.advance(5)

        usage = await q.usage()
        assert usage["in-flight"] == 2
        assert usage["tpm"] < 1000  # tokens stay charged at the estimate (minus what drained)
        assert (await q.reserve(input_tokens=1)).decision == pb.DECISION_ALLOWED


async def test_lease_expiry_with_redis_time(quotad: QuotadFactory) -> None:
    async with quotad(POLICY, subject="alice") as q:
        lease = duration_pb2.Duration(nanos=150_000_000)
        await q.reserve(lease=lease)
        await q.reserve(lease=lease)
        assert (await q.reserve()).decision == pb.DECISION_DENIED
        await asyncio.sleep(0.2)
        assert (await q.usage())["in-flight"] == 2


async def test_late_commit_still_reconciles(quotad: QuotadFactory) -> None:
    clock = ManualClock()
    async with quotad(POLICY, clock=clock, subject="alice") as q:
        reserved = await q.reserve(
            input_tokens=200, max_output_tokens=300, lease=duration_pb2.Duration(seconds=1)
        )
        clock.advance(2)
        assert (await q.usage())["in-flight"] == 2

        committed = await q.commit(reserved.reservation_id, input_tokens=200, output_tokens=100)

        assert committed.lease_expired
        # 500 was charged; 2 s drained 1000/60*2 = 33.3; the commit refunds 200.
        assert (await q.usage())["tpm"] == int(1000 - (500 - 1000 / 30 - 200))
        assert (await q.usage())["in-flight"] == 2


async def test_late_commit_past_the_window_charges_the_overage_now(quotad: QuotadFactory) -> None:
    clock = ManualClock()
    async with quotad(POLICY, clock=clock, subject="alice") as q:
        reserved = await q.reserve(max_output_tokens=100)
        clock.advance(61)  # the reservation has left the window
        assert (await q.usage())["output-window"] == 500
        await q.commit(reserved.reservation_id, input_tokens=0, output_tokens=250)
        assert (await q.usage())["output-window"] == 500 - 150


async def test_unknown_and_expired_reservations_are_not_found(quotad: QuotadFactory) -> None:
    policy = POLICY.replace("retention: 1h", "retention: 100ms")
    async with quotad(policy, subject="alice") as q:
        error = await rpc_error(q.commit("0" * 40, input_tokens=1, output_tokens=1))
        assert error.code().name == "NOT_FOUND"
        error = await rpc_error(q.release("f" * 40))
        assert error.code().name == "NOT_FOUND"

        reserved = await q.reserve(lease=duration_pb2.Duration(nanos=100_000_000))
        await asyncio.sleep(0.3)  # lease + retention
        error = await rpc_error(q.commit(reserved.reservation_id, input_tokens=1, output_tokens=1))
        assert error.code().name == "NOT_FOUND"

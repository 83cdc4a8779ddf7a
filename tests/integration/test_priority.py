"""Priorities: shared limits keep headroom for higher priorities, inside the one atomic script."""

from __future__ import annotations

import asyncio
import random

import redis.asyncio as aioredis
from quotad.v1 import quota_pb2 as pb

from tests.conftest import ManualClock, QuotadFactory, rpc_error, snapshot

POLICY = """
    defaults: {tier: paid}
    admission: {low: 0.6, normal: 0.85, high: 1.0}
    tiers:
      paid: {limits: []}
      batch: {priority: low, limits: []}
    global:
      limits:
        - {name: provider-tpm, metric: input_tokens, limit: 100, period: 1d}
    tenants:
      "*":
        limits:
          - {name: tenant-rpd, metric: requests, limit: 1000, period: 1d, admission: {low: 0.5}}
"""
LOW, NORMAL, HIGH = pb.PRIORITY_LOW, pb.PRIORITY_NORMAL, pb.PRIORITY_HIGH


async def test_low_priority_stops_first_and_high_keeps_headroom(quotad: QuotadFactory) -> None:
    async with quotad(POLICY, clock=ManualClock(), subject="alice") as q:
        assert (await q.reserve(input_tokens=55, priority=LOW)).decision == pb.DECISION_ALLOWED
        low = await q.reserve(input_tokens=10, priority=LOW)
        assert low.decision == pb.DECISION_DENIED  # 65 > 60% of 100
        assert low.binding_limit == "provider-tpm"
        assert low.priority == LOW
        provider = next(s for s in low.limits if s.name == "provider-tpm")
        assert provider.remaining == 5  # what LOW may still fill

        assert (
            await q.reserve(input_tokens=31, priority=NORMAL)
        ).decision == pb.DECISION_DENIED  # 85 at most
        assert (await q.reserve(input_tokens=30, priority=HIGH)).decision == pb.DECISION_ALLOWED  # 85 of 100
        assert (await q.reserve(input_tokens=15, priority=HIGH)).decision == pb.DECISION_ALLOWED  # 100
        assert (await q.reserve(input_tokens=1, priority=HIGH)).decision == pb.DECISION_DENIED
        assert (await q.usage())["provider-tpm"] == 0


async def test_a_low_request_larger_than_its_share_never_fits(quotad: QuotadFactory) -> None:
    async with quotad(POLICY, clock=ManualClock(), subject="alice") as q:
        response = await q.reserve(input_tokens=70, priority=LOW)
        assert response.deny_reason == pb.DENY_REASON_EXCEEDS_CAPACITY
        assert (await q.reserve(input_tokens=70, priority=HIGH)).decision == pb.DECISION_ALLOWED


async def test_tiers_set_the_default_priority(quotad: QuotadFactory) -> None:
    async with quotad(POLICY, clock=ManualClock(), subject="alice") as q:
        assert (await q.reserve(input_tokens=60, tier="batch")).priority == LOW
        denied = await q.reserve(input_tokens=1, tier="batch")
        assert denied.decision == pb.DECISION_DENIED
        assert (await q.reserve(input_tokens=1, tier="paid")).priority == NORMAL
        assert (await q.reserve(input_tokens=1, tier="batch", priority=HIGH)).decision == pb.DECISION_ALLOWED


async def test_concurrent_mixed_priorities_never_exceed_the_shared_limit(quotad: QuotadFactory) -> None:
    rng = random.Random(3)
    requests = [(rng.choice([LOW, NORMAL, HIGH]), rng.randint(1, 9)) for _ in range(300)]
    async with quotad(POLICY, subject="alice") as q:
        responses = await asyncio.gather(*(q.reserve(input_tokens=t, priority=p) for p, t in requests))
        admitted = [
            (p, t) for (p, t), r in zip(requests, responses, strict=True) if r.decision == pb.DECISION_ALLOWED
        ]
        assert sum(t for _, t in admitted) <= 100
        # Every LOW admission happened while at most 60 were in use, so LOW alone stayed within 60.
        assert sum(t for p, t in admitted if p == LOW) <= 60
        assert sum(t for p, t in admitted if p != HIGH) <= 85


async def test_unknown_priority_is_invalid(quotad: QuotadFactory, redis_client: aioredis.Redis) -> None:
    async with quotad(POLICY, clock=ManualClock(), subject="alice") as q:
        before = await snapshot(redis_client)
        error = await rpc_error(q.reserve(input_tokens=1, priority=7))  # not a Priority value
        assert error.code().name == "INVALID_ARGUMENT"
        assert "priority" in (error.details() or "")
        assert await snapshot(redis_client) == before

"""Output reservations that learn from Commits, and the accuracy report."""

from __future__ import annotations

import redis.asyncio as aioredis
from quotad.v1 import quota_pb2 as pb
from quotad_server.usage_stats import output_quantile

from tests.conftest import ManualClock, Quotad, QuotadFactory, running_quotad

POLICY = """
    defaults: {tier: free}
    models:
      gpt-4o:
        output_estimate: learned
        learned_quantile: 0.9
        learned_min_samples: 20
        learned_window: 50
      gpt-4:
        output_estimate: max_tokens
    tiers:
      free:
        limits:
          - {name: output, metric: output_tokens, limit: 1000000, period: 1d}
      premium:
        limits: []
"""


async def _call(q: Quotad, model: str, max_output: int, actual_output: int, actual_input: int = 100) -> int:
    """Reserve, then commit `actual_output`; returns the output tokens the reservation held."""
    reserved = await q.reserve(model=model, input_tokens=100, max_output_tokens=max_output)
    assert reserved.decision == pb.DECISION_ALLOWED
    await q.commit(reserved.reservation_id, input_tokens=actual_input, output_tokens=actual_output)
    held: int = reserved.reserved.output_tokens
    return held


async def test_reservations_learn_a_high_quantile_of_actual_output(quotad: QuotadFactory) -> None:
    async with quotad(POLICY, clock=ManualClock(), subject="alice") as q:
        # Until enough samples exist, the reservation is max_output_tokens.
        held = [await _call(q, "gpt-4o", 4000, 100 if i % 10 else 400) for i in range(20)]
        assert held == [4000] * 20

        # 90% of replies are 100 tokens, 10% are 400: the 0.9 quantile is in 100's bucket.
        learned = await _call(q, "gpt-4o", 4000, 100)
        assert 100 <= learned <= 110  # rounded up to its histogram bucket, never down
        # Never more than the caller's own max_tokens.
        assert await _call(q, "gpt-4o", 50, 30) == 50
        # A model that does not learn keeps reserving max_tokens; another tier learns on its own.
        assert await _call(q, "gpt-4", 4000, 100) == 4000
        premium = await q.reserve(model="gpt-4o", tier="premium", input_tokens=1, max_output_tokens=4000)
        assert premium.reserved.output_tokens == 4000


async def test_a_reply_longer_than_the_learned_reservation_is_charged_in_full(quotad: QuotadFactory) -> None:
    async with quotad(POLICY, clock=ManualClock(), subject="alice") as q:
        for _ in range(20):
            await _call(q, "gpt-4o", 4000, 100)
        before = (await q.usage())["output"]
        held = await _call(q, "gpt-4o", 4000, 3000)
        assert held < 200
        assert (await q.usage())["output"] == before - 3000  # the overrun is charged, not lost


async def test_learning_is_shared_by_replicas(quotad: QuotadFactory, redis_url: str) -> None:
    async with quotad(POLICY, clock=ManualClock(), subject="alice") as first:
        for _ in range(20):
            await _call(first, "gpt-4o", 4000, 200)
        async with running_quotad(POLICY, redis_url, clock=ManualClock(), subject="bob") as second:
            reserved = await second.reserve(model="gpt-4o", input_tokens=1, max_output_tokens=4000)
            assert 200 <= reserved.reserved.output_tokens <= 220


async def test_statistics_stay_bounded_and_favour_recent_calls(
    quotad: QuotadFactory, redis_client: aioredis.Redis
) -> None:
    async with quotad(POLICY, clock=ManualClock(), subject="alice") as q:
        for _ in range(100):  # the window is 50: halved as it reaches 100
            await _call(q, "gpt-4o", 4000, 1000)
        for _ in range(250):
            await _call(q, "gpt-4o", 4000, 10)
        (stats_key,) = await redis_client.keys("*{stats}*")
        raw = await redis_client.hgetall(stats_key)
        stats = {(k.decode() if isinstance(k, bytes) else k): int(v) for k, v in raw.items()}
        assert stats["n"] < 100
        assert len(stats) < 30
        # Halving every 50 samples, the old 1000-token replies now weigh under 10%: the quantile follows
        # the recent ones.
        assert output_quantile(stats, 0.9, 20) is not None
        assert output_quantile(stats, 0.9, 20) <= 11  # type: ignore[operator]


async def test_accuracy_report(quotad: QuotadFactory) -> None:
    async with quotad(POLICY, clock=ManualClock(), subject="alice") as q:
        for i in range(10):
            await _call(q, "gpt-4", 1000, 250 if i < 9 else 2000, actual_input=100)
        report = await q.stub.GetAccuracy(pb.GetAccuracyRequest(model="gpt-4"))
        assert report.commits == 10
        assert report.input_ratio.p50 == 1.0
        assert 0.23 < report.output_ratio.p50 < 0.27  # 250 of 1000, to the histogram's resolution
        assert report.output_ratio.p95 > 1.8  # the one reply of 2000
        assert report.estimated_tokens == 10 * 1100
        assert report.actual_tokens == 10 * 100 + 9 * 250 + 2000
        assert report.refunded_tokens == 9 * 750
        assert report.overrun_tokens == 1000
        assert not report.learning
        assert report.learned_output_tokens == 0

        learned = await q.stub.GetAccuracy(pb.GetAccuracyRequest(model="gpt-4o", tier="free"))
        assert learned.learning
        assert learned.commits == 0

"""The /metrics endpoint of a real server after real traffic: every number is the one that happened."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator

import pytest
from quotad.v1 import quota_pb2 as pb
from quotad_server import __version__
from quotad_server.metrics import Metrics, MetricsEndpoint
from quotad_server.store.embedded import EmbeddedRedis

from tests.conftest import ManualClock, QuotadFactory, rpc_error, running_quotad
from tests.metrics_scrape import Samples, scrape, value

POLICY = """
    defaults: {tier: free}
    leases: {default: 10s, min: 1s, max: 1m}
    models: {gpt-4o: {}, gpt-4o-mini: {}}
    tiers:
      free:
        limits:
          - {name: requests-per-day, metric: requests, limit: 3, period: 1d, algorithm: sliding_window}
          - {name: in-flight, metric: concurrent, limit: 10}
    global:
      limits:
        - {name: gpt-4o-tpm, metric: total_tokens, limit: 800000, period: 1m, model: gpt-4o}
"""


async def scrape_settled(port: int, rpcs: int) -> Samples:
    """Scrape once all `rpcs` RPCs the client made are recorded: a failed RPC's status can reach
    the client a moment before the server's handler has recorded it."""
    deadline = time.monotonic() + 5
    while value(samples := scrape(port), "quotad_rpc_duration_seconds_count") < rpcs:
        assert time.monotonic() < deadline, "the server did not record every RPC"
        await asyncio.sleep(0.02)
    return samples


@pytest.fixture
def metrics() -> Iterator[tuple[Metrics, int]]:
    metrics = Metrics()
    endpoint = MetricsEndpoint(metrics, "127.0.0.1:0")
    try:
        yield metrics, endpoint.port
    finally:
        endpoint.close()


async def test_decisions_tokens_settlements_and_rpcs_are_counted(
    quotad: QuotadFactory, metrics: tuple[Metrics, int]
) -> None:
    registry, port = metrics
    clock = ManualClock()
    async with quotad(POLICY, clock=clock, metrics=registry, subject="alice", model="gpt-4o") as q:
        first, second, third = [await q.reserve(input_tokens=100, max_output_tokens=50) for _ in range(3)]
        denied = await q.reserve(input_tokens=100, max_output_tokens=50)
        assert denied.decision == pb.DECISION_DENIED
        replay_key = {"idempotency_key": "k1"}
        assert (await q.reserve(model="gpt-4o-mini", **replay_key)).decision == pb.DECISION_DENIED

        await q.commit(first.reservation_id, input_tokens=80, output_tokens=100)
        await q.commit(first.reservation_id, input_tokens=80, output_tokens=100)  # a repeat: no change
        await q.release(second.reservation_id)
        clock.advance(11)  # the third lease (10 s) has expired: its Commit is late
        late = await q.commit(third.reservation_id, input_tokens=100, output_tokens=50)
        assert late.lease_expired
        error = await rpc_error(q.reserve(input_tokens=-1))
        assert error.code().name == "INVALID_ARGUMENT"

    samples = await scrape_settled(port, rpcs=10)
    allowed = {"decision": "allowed", "tier": "free", "model": "gpt-4o", "binding_limit": "", "reason": ""}
    assert value(samples, "quotad_decisions_total", allowed) == 3
    assert value(samples, "quotad_decisions_total", {"decision": "denied"}) == 2
    assert (
        value(
            samples,
            "quotad_decisions_total",
            {
                "decision": "denied",
                "model": "gpt-4o-mini",
                "reason": "limit_exceeded",
                "binding_limit": "requests-per-day",
            },
        )
        == 1
    )
    assert value(samples, "quotad_tokens_reserved_total", {"type": "input", "model": "gpt-4o"}) == 300
    assert value(samples, "quotad_tokens_reserved_total", {"type": "output"}) == 150
    assert value(samples, "quotad_tokens_committed_total", {"type": "input"}) == 80 + 100
    assert value(samples, "quotad_tokens_committed_total", {"type": "output"}) == 100 + 50
    # Commit refunds what the estimate had above the actual; Release refunds the whole estimate.
    assert value(samples, "quotad_tokens_refunded_total", {"type": "input"}) == 20 + 100
    assert value(samples, "quotad_tokens_refunded_total", {"type": "output"}) == 50
    assert value(samples, "quotad_settlements_total", {"method": "commit"}) == 2
    assert value(samples, "quotad_settlements_total", {"method": "release"}) == 1
    assert value(samples, "quotad_late_settlements_total", {"method": "commit"}) == 1
    assert value(samples, "quotad_late_settlements_total", {"method": "release"}) == 0

    # Estimation error: input 80/100 and 100/100, output 100/50 and 50/50.
    ratio = "quotad_commit_actual_to_estimate_ratio"
    assert value(samples, f"{ratio}_count", {"type": "input"}) == 2
    assert value(samples, f"{ratio}_bucket", {"type": "input", "le": "0.9"}) == 1
    assert value(samples, f"{ratio}_sum", {"type": "output"}) == pytest.approx(2.0 + 1.0)
    assert value(samples, f"{ratio}_bucket", {"type": "output", "le": "1.0"}) == 1

    rpc = "quotad_rpc_duration_seconds_count"
    assert value(samples, rpc, {"method": "CheckAndReserve", "code": "OK"}) == 5
    assert value(samples, rpc, {"method": "CheckAndReserve", "code": "INVALID_ARGUMENT"}) == 1
    assert value(samples, rpc, {"method": "Commit", "code": "OK"}) == 3
    assert value(samples, rpc, {"method": "Release", "code": "OK"}) == 1
    assert value(samples, "quotad_redis_call_duration_seconds_count", {"operation": "reserve"}) == 5
    assert value(samples, "quotad_redis_call_duration_seconds_count", {"operation": "settle"}) == 4
    assert value(samples, "quotad_redis_errors_total") == 0


async def test_the_policy_limits_and_the_build_are_exported(
    quotad: QuotadFactory, metrics: tuple[Metrics, int]
) -> None:
    registry, port = metrics
    async with quotad(POLICY, metrics=registry, subject="alice"):
        samples = scrape(port)
    rpd = {"limit": "requests-per-day", "scope": "subject", "owner": "free", "metric": "requests"}
    assert value(samples, "quotad_policy_limit", rpd) == 3
    assert value(samples, "quotad_policy_limit_period_seconds", rpd) == 86_400
    tpm = {"limit": "gpt-4o-tpm", "scope": "global", "model": "gpt-4o"}
    assert value(samples, "quotad_policy_limit", tpm) == 800_000
    assert value(samples, "quotad_policy_limit", {"limit": "in-flight", "metric": "concurrent"}) == 10
    assert value(samples, "quotad_policy_limit_period_seconds", {"limit": "in-flight"}) == 0  # none
    assert value(samples, "quotad_build_info", {"version": __version__}) == 1
    assert value(samples, "process_resident_memory_bytes") > 0


async def test_redis_failures_are_counted_by_operation_and_reason(metrics: tuple[Metrics, int]) -> None:
    registry, port = metrics
    with EmbeddedRedis() as own_redis:
        async with running_quotad(POLICY, own_redis.url, metrics=registry, subject="a", model="gpt-4o") as q:
            await q.reserve()
            own_redis.stop()
            error = await rpc_error(q.reserve())
            assert error.code().name == "UNAVAILABLE"
            samples = await scrape_settled(port, rpcs=2)
    assert value(samples, "quotad_redis_errors_total", {"operation": "reserve", "reason": "connection"}) == 1
    assert value(samples, "quotad_rpc_duration_seconds_count", {"code": "UNAVAILABLE"}) == 1


async def test_money_is_counted_in_micro_dollars(quotad: QuotadFactory, metrics: tuple[Metrics, int]) -> None:
    registry, port = metrics
    policy = POLICY.replace("gpt-4o: {}", "gpt-4o: {price: {input: 2.5, output: 10}}")
    async with quotad(policy, clock=ManualClock(), metrics=registry, subject="alice", model="gpt-4o") as q:
        kept = await q.reserve(input_tokens=1000, max_output_tokens=100)  # 2,500 + 1,000 micro-dollars
        released = await q.reserve(input_tokens=400, max_output_tokens=1)  # 1,000 + 10
        await q.commit(kept.reservation_id, input_tokens=1000, output_tokens=40)  # 2,500 + 400
        await q.release(released.reservation_id)
        samples = await scrape_settled(port, 4)
    assert (
        value(samples, "quotad_cost_micro_usd_total", {"kind": "reserved", "model": "gpt-4o"})
        == 3_500 + 1_010
    )
    assert value(samples, "quotad_cost_micro_usd_total", {"kind": "committed", "model": "gpt-4o"}) == 2_900
    assert (
        value(samples, "quotad_cost_micro_usd_total", {"kind": "refunded", "model": "gpt-4o"}) == 600 + 1_010
    )

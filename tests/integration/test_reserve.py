"""CheckAndReserve and GetUsage against a real Valkey and a real gRPC server."""

from __future__ import annotations

import asyncio

import redis.asyncio as aioredis
from google.protobuf import duration_pb2
from quotad.v1 import quota_pb2 as pb

from tests.conftest import START_US, ManualClock, QuotadFactory, rpc_error, snapshot

FOUR_LIMITS = """
    defaults: {tier: free}
    leases: {default: 30s, min: 1s, max: 10m}
    tiers:
      free:
        limits:
          - {name: rpm, metric: requests, limit: 10, period: 1m, algorithm: sliding_window}
          - {name: tpm, metric: total_tokens, limit: 1000, period: 1m}
          - {name: in-flight, metric: concurrent, limit: 3}
    tenants:
      "*":
        limits:
          - {name: tenant-input, metric: input_tokens, limit: 5000, period: 1h}
    global:
      limits:
        - {name: provider-output, metric: output_tokens, limit: 800, period: 1m}
"""


async def test_allowed_reserves_on_every_limit(quotad: QuotadFactory) -> None:
    clock = ManualClock()
    async with quotad(FOUR_LIMITS, clock=clock, subject="alice") as q:
        response = await q.reserve(input_tokens=300, max_output_tokens=200)

        assert response.decision == pb.DECISION_ALLOWED
        assert len(response.reservation_id) == 40
        assert response.tenant == "default"
        assert response.tier == "free"
        assert (
            response.reserved.requests,
            response.reserved.input_tokens,
            response.reserved.output_tokens,
        ) == (
            1,
            300,
            200,
        )
        lease_end_us = response.lease_expires_at.seconds * 1_000_000 + response.lease_expires_at.nanos // 1000
        assert lease_end_us == START_US + 30_000_000
        remaining = {s.name: s.remaining for s in response.limits}
        assert remaining == {
            "rpm": 9,
            "tpm": 500,
            "in-flight": 2,
            "tenant-input": 4700,
            "provider-output": 600,
        }
        assert not any(s.denied or s.binding for s in response.limits)
        assert await q.usage() == remaining


async def test_a_denial_changes_no_counter(quotad: QuotadFactory, redis_client: aioredis.Redis) -> None:
    clock = ManualClock()
    async with quotad(FOUR_LIMITS, clock=clock, subject="alice") as q:
        first = await q.reserve(input_tokens=100, max_output_tokens=700)
        assert first.decision == pb.DECISION_ALLOWED
        before_usage = await q.usage()
        before = await snapshot(redis_client)

        # Fits rpm, tpm, in-flight and the tenant; only the provider's output limit denies.
        denied = await q.reserve(input_tokens=50, max_output_tokens=150)

        assert denied.decision == pb.DECISION_DENIED
        assert denied.deny_reason == pb.DENY_REASON_LIMIT_EXCEEDED
        assert denied.binding_limit == "provider-output"
        assert [s.name for s in denied.limits if s.denied] == ["provider-output"]
        assert [s.name for s in denied.limits if s.binding] == ["provider-output"]
        assert denied.reservation_id == ""
        assert await snapshot(redis_client) == before
        assert await q.usage() == before_usage


async def test_cost_above_capacity_never_fits(quotad: QuotadFactory) -> None:
    async with quotad(FOUR_LIMITS, clock=ManualClock(), subject="alice") as q:
        response = await q.reserve(input_tokens=900, max_output_tokens=200)

        assert response.decision == pb.DECISION_DENIED
        assert response.deny_reason == pb.DENY_REASON_EXCEEDS_CAPACITY
        assert response.binding_limit == "tpm"
        assert not response.HasField("retry_after")


async def _retry_after_us(response: pb.CheckAndReserveResponse) -> int:
    assert response.decision == pb.DECISION_DENIED
    assert response.HasField("retry_after")
    return response.retry_after.seconds * 1_000_000 + response.retry_after.nanos // 1000


async def test_retry_after_token_bucket_is_exact(quotad: QuotadFactory) -> None:
    clock = ManualClock()
    async with quotad(FOUR_LIMITS, clock=clock, subject="alice") as q:
        assert (await q.reserve(input_tokens=400, max_output_tokens=400)).decision == pb.DECISION_ALLOWED

        # 800 in use of 1000; 500 more needs 300 drained at 1000/60s: 18 s.
        wait_us = await _retry_after_us(await q.reserve(input_tokens=500))
        assert wait_us == 18_000_000

        clock.advance(wait_us / 1e6 - 0.001)
        assert (await q.reserve(input_tokens=500)).decision == pb.DECISION_DENIED
        clock.advance(0.001)
        assert (await q.reserve(input_tokens=500)).decision == pb.DECISION_ALLOWED


async def test_sliding_window_never_exceeds_limit_in_any_window(quotad: QuotadFactory) -> None:
    policy = """
        defaults: {tier: t}
        tiers:
          t:
            limits:
              - {name: per-10s, metric: requests, limit: 3, period: 10s, algorithm: sliding_window}
    """
    clock = ManualClock()
    async with quotad(policy, clock=clock, subject="alice") as q:
        for _ in range(3):
            assert (await q.reserve()).decision == pb.DECISION_ALLOWED
            clock.advance(1)
        # Admitted at t=0, 1, 2; now t=3: the first leaves the window at t=10.
        denied = await q.reserve()
        assert await _retry_after_us(denied) == 7_000_000
        clock.advance(6.999999)
        assert (await q.reserve()).decision == pb.DECISION_DENIED
        clock.advance(0.000001)
        assert (await q.reserve()).decision == pb.DECISION_ALLOWED
        # t=10: entries at 1, 2, 10 are in the window; the next slot opens at t=11.
        assert await _retry_after_us(await q.reserve()) == 1_000_000


def _tail(key: bytes | str) -> str:
    text = key.decode() if isinstance(key, bytes) else key
    return text[-3:] if text.endswith(":wr") else text.rsplit(":", 1)[-1]


async def test_request_windows_of_one_subject_share_a_zset_and_count_their_own_spans(
    quotad: QuotadFactory, redis_client: aioredis.Redis
) -> None:
    policy = """
        defaults: {tier: t}
        models: {gpt-4o: {}, gpt-4o-mini: {}}
        tiers:
          t:
            limits:
              - {name: per-10s, metric: requests, limit: 2, period: 10s, algorithm: sliding_window}
              - {name: per-100s, metric: requests, limit: 3, period: 100s, algorithm: sliding_window}
              - {name: mini-per-10s, metric: requests, limit: 5, period: 10s, algorithm: sliding_window,
                 model: gpt-4o-mini}
    """
    clock = ManualClock()
    async with quotad(policy, clock=clock, subject="alice") as q:
        first = await q.reserve(model="gpt-4o")
        assert first.decision == pb.DECISION_ALLOWED
        assert (await q.reserve(model="gpt-4o")).decision == pb.DECISION_ALLOWED
        assert (await q.reserve(model="gpt-4o")).binding_limit == "per-10s"
        # One zset holds both windows' requests.
        assert [_tail(k) for k in await redis_client.keys("*:l:s:*")] == [":wr"]

        clock.advance(10)  # both requests left the 10 s window, not the 100 s one
        assert await q.usage() == {"per-10s": 2, "per-100s": 1}
        third = await q.reserve(model="gpt-4o-mini")
        assert third.decision == pb.DECISION_ALLOWED
        assert {s.name: s.remaining for s in third.limits} == {"per-10s": 1, "per-100s": 0, "mini-per-10s": 4}
        keys = sorted(_tail(k) for k in await redis_client.keys("*:l:s:*"))
        assert keys == [":wr", "gpt-4o-mini"]  # the model-filtered window counts apart
        denied = await q.reserve(model="gpt-4o")
        assert denied.binding_limit == "per-100s"
        assert await _retry_after_us(denied) == 90_000_000  # the first leaves the 100 s window

        # A release refunds the request in every window that still counts it, once.
        await q.release(first.reservation_id)
        assert await q.usage() == {"per-10s": 1, "per-100s": 1}
        await q.release(third.reservation_id)
        assert await q.usage(model="gpt-4o-mini") == {"per-10s": 2, "per-100s": 2, "mini-per-10s": 5}
        assert await q.usage() == {"per-10s": 2, "per-100s": 2}


async def test_a_shared_request_window_is_trimmed_to_its_longest_span(
    quotad: QuotadFactory, redis_client: aioredis.Redis
) -> None:
    policy = """
        defaults: {tier: t}
        tiers:
          t:
            limits:
              - {name: per-10s, metric: requests, limit: 1000, period: 10s, algorithm: sliding_window}
              - {name: per-100s, metric: requests, limit: 1000, period: 100s, algorithm: sliding_window}
    """
    clock = ManualClock()
    async with quotad(policy, clock=clock, subject="alice") as q:
        assert (await q.reserve()).decision == pb.DECISION_ALLOWED
        (window,) = await redis_client.keys("*:l:s:*")

        # One admission in 16 trims (chosen by the random id): 200 make a miss ~1e-6 likely.
        clock.advance(50)
        assert {(await q.reserve()).decision for _ in range(200)} == {pb.DECISION_ALLOWED}
        assert await redis_client.zcard(window) == 201  # the first still counts in the 100 s window
        assert await q.usage() == {"per-10s": 800, "per-100s": 799}

        clock.advance(51)  # the first has left the longest window
        assert {(await q.reserve()).decision for _ in range(200)} == {pb.DECISION_ALLOWED}
        assert await redis_client.zcard(window) == 400
        assert await q.usage() == {"per-10s": 800, "per-100s": 600}


async def test_sliding_window_over_tokens_waits_for_enough_to_leave(quotad: QuotadFactory) -> None:
    policy = """
        defaults: {tier: t}
        tiers:
          t:
            limits:
              - {name: tokens-10s, metric: input_tokens, limit: 100, period: 10s, algorithm: sliding_window}
    """
    clock = ManualClock()
    async with quotad(policy, clock=clock, subject="alice") as q:
        for cost in (30, 30, 40):  # at t=0, 1, 2
            assert (await q.reserve(input_tokens=cost)).decision == pb.DECISION_ALLOWED
            clock.advance(1)
        # 100 in the window at t=3; 50 more fits only once 30 and 30 have left (t=11).
        assert await _retry_after_us(await q.reserve(input_tokens=50)) == 8_000_000
        clock.advance(7)  # t=10: only the first 30 left
        assert (await q.reserve(input_tokens=50)).decision == pb.DECISION_DENIED
        assert (await q.reserve(input_tokens=30)).decision == pb.DECISION_ALLOWED


async def test_concurrency_retry_after_is_the_earliest_lease_end(quotad: QuotadFactory) -> None:
    clock = ManualClock()
    async with quotad(FOUR_LIMITS, clock=clock, subject="alice") as q:
        for lease_s in (20, 10, 30):
            response = await q.reserve(lease=duration_pb2.Duration(seconds=lease_s))
            assert response.decision == pb.DECISION_ALLOWED
        denied = await q.reserve()
        assert denied.binding_limit == "in-flight"
        assert await _retry_after_us(denied) == 10_000_000


async def test_retry_after_with_redis_time(quotad: QuotadFactory) -> None:
    """The production clock (Redis TIME): waiting retry_after and retrying is admitted."""
    policy = """
        defaults: {tier: t}
        tiers:
          t:
            limits:
              - {name: per-second, metric: input_tokens, limit: 100, period: 1s}
    """
    async with quotad(policy, subject="alice") as q:
        assert (await q.reserve(input_tokens=100)).decision == pb.DECISION_ALLOWED
        denied = await q.reserve(input_tokens=40)
        wait_us = await _retry_after_us(denied)
        assert 0 < wait_us <= 400_000
        await asyncio.sleep(wait_us / 1e6)
        assert (await q.reserve(input_tokens=40)).decision == pb.DECISION_ALLOWED


async def test_scopes_share_counters_as_the_policy_says(quotad: QuotadFactory) -> None:
    async with quotad(FOUR_LIMITS, clock=ManualClock()) as q:
        await q.reserve(subject="alice", tenant="acme", input_tokens=100, max_output_tokens=10)
        await q.reserve(subject="bob", tenant="acme", input_tokens=200, max_output_tokens=20)
        await q.reserve(subject="carol", tenant="globex", input_tokens=400, max_output_tokens=40)

        alice = await q.usage(subject="alice", tenant="acme")
        assert alice["tpm"] == 1000 - 110  # per subject
        assert alice["tenant-input"] == 5000 - 300  # acme's subjects together
        assert alice["provider-output"] == 800 - 70  # everybody
        carol = await q.usage(subject="carol", tenant="globex")
        assert carol["tenant-input"] == 5000 - 400
        # The same subject name in another tenant is another subject.
        assert (await q.usage(subject="alice", tenant="globex"))["tpm"] == 1000


async def test_model_specific_limits_apply_only_to_their_model(quotad: QuotadFactory) -> None:
    policy = """
        defaults: {tier: t}
        models: {gpt-4o: {}, gpt-4o-mini: {}}
        tiers:
          t: {limits: []}
        global:
          limits:
            - {name: gpt-4o-rpm, metric: requests, limit: 1, period: 1m, model: gpt-4o}
    """
    async with quotad(policy, clock=ManualClock(), subject="alice") as q:
        assert (await q.reserve(model="gpt-4o")).decision == pb.DECISION_ALLOWED
        assert (await q.reserve(model="gpt-4o")).decision == pb.DECISION_DENIED
        mini = await q.reserve(model="gpt-4o-mini")
        assert mini.decision == pb.DECISION_ALLOWED
        assert list(mini.limits) == []
        assert await q.usage(model="gpt-4o") == {"gpt-4o-rpm": 0}
        assert await q.usage() == {}


async def test_idempotency_key_returns_the_first_reservation(
    quotad: QuotadFactory, redis_client: aioredis.Redis
) -> None:
    async with quotad(FOUR_LIMITS, clock=ManualClock(), subject="alice") as q:
        first = await q.reserve(input_tokens=100, max_output_tokens=50, idempotency_key="req-1")
        after_first = await snapshot(redis_client)
        again = await q.reserve(input_tokens=100, max_output_tokens=50, idempotency_key="req-1")

        assert again.decision == pb.DECISION_ALLOWED
        assert again.replayed
        assert not first.replayed
        assert again.reservation_id == first.reservation_id
        assert again.lease_expires_at == first.lease_expires_at
        assert again.reserved == first.reserved
        # Nothing changed but the record's count of hand-outs (an undo of a late reply reads it).
        record_key = next(k for k in await redis_client.keys("*:r:*"))
        record = await redis_client.get(record_key)
        assert isinstance(record, bytes)
        assert record.startswith(b"r1 ")
        await redis_client.set(record_key, b"r" + record[2:], keepttl=True)
        assert await snapshot(redis_client) == after_first

        # Another subject may use the same key; the same subject may not reuse it for another request.
        other = await q.reserve(
            subject="bob", input_tokens=100, max_output_tokens=50, idempotency_key="req-1"
        )
        assert other.reservation_id != first.reservation_id
        error = await rpc_error(q.reserve(input_tokens=999, idempotency_key="req-1"))
        assert error.code().name == "FAILED_PRECONDITION"

"""Waiting instead of failing: a line in Redis, in priority then arrival order, woken by capacity."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from collections.abc import Awaitable
from dataclasses import replace
from pathlib import Path

import grpc
import pytest
import redis.asyncio as aioredis
from google.protobuf import duration_pb2
from quotad.v1 import quota_pb2 as pb
from quotad.v1 import quota_pb2_grpc as pb_grpc
from quotad_server.core import ReserveRequest
from quotad_server.store.embedded import free_port

from tests.conftest import Quotad, QuotadFactory, rpc_error, running_quotad

POLICY = """
    defaults: {tier: paid}
    waiting: {max_wait: 10s, max_line: 3, aging: 1h, heartbeat: 5s}
    tiers:
      paid: {limits: []}
    global:
      limits:
        - {name: slots, metric: concurrent, limit: 1}
"""
LOW, HIGH = pb.PRIORITY_LOW, pb.PRIORITY_HIGH


def seconds(value: float) -> duration_pb2.Duration:
    duration = duration_pb2.Duration()
    duration.FromNanoseconds(int(value * 1e9))
    return duration


async def line_length(client: aioredis.Redis) -> int:
    total = 0
    for line in await client.keys("*:q"):
        total += await client.zcard(line)
    return total


async def until_queued(client: aioredis.Redis, count: int) -> None:
    deadline = time.monotonic() + 5
    while await line_length(client) != count:
        assert time.monotonic() < deadline, f"expected {count} waiting"
        await asyncio.sleep(0.01)


def waited_s(response: pb.CheckAndReserveResponse) -> float:
    return response.waited.seconds + response.waited.nanos / 1e9


async def test_a_release_wakes_the_waiter_at_once(
    quotad: QuotadFactory, redis_client: aioredis.Redis
) -> None:
    async with quotad(POLICY, subject="alice") as q:
        holder = await q.reserve()
        waiter = asyncio.ensure_future(q.reserve(max_wait=seconds(8)))
        await until_queued(redis_client, 1)
        await q.release(holder.reservation_id)
        response = await waiter
        assert response.decision == pb.DECISION_ALLOWED
        assert waited_s(response) < 2.5  # the heartbeat is 5 s: the release woke it
        assert await line_length(redis_client) == 0


async def test_refill_admits_the_waiter_when_it_fits(quotad: QuotadFactory) -> None:
    policy = POLICY.replace(
        "- {name: slots, metric: concurrent, limit: 1}",
        "- {name: tokens, metric: input_tokens, limit: 10, period: 1s}",
    )
    async with quotad(policy, subject="alice") as q:
        assert (await q.reserve(input_tokens=10)).decision == pb.DECISION_ALLOWED
        response = await q.reserve(input_tokens=5, max_wait=seconds(3))
        assert response.decision == pb.DECISION_ALLOWED
        assert 0.4 <= waited_s(response) < 1.5  # 5 tokens refill in 0.5 s


async def test_waiters_are_admitted_in_priority_then_arrival_order_across_replicas(
    quotad: QuotadFactory, redis_url: str, redis_client: aioredis.Redis
) -> None:
    async with (
        quotad(POLICY.replace("max_line: 3", "max_line: 10")) as first,
        running_quotad(POLICY.replace("max_line: 3", "max_line: 10"), redis_url) as second,
    ):
        holder = await first.reserve(subject="holder")
        order: list[str] = []

        async def wait(replica: Quotad, name: str, priority: int) -> pb.CheckAndReserveResponse:
            response = await replica.reserve(subject=name, priority=priority, max_wait=seconds(8))
            order.append(name)
            return response

        tasks = []
        for count, (replica, name, priority) in enumerate(
            [
                (first, "low-1", LOW),
                (second, "high-1", HIGH),
                (first, "low-2", LOW),
                (second, "high-2", HIGH),
            ],
            1,
        ):
            tasks.append(asyncio.ensure_future(wait(replica, name, priority)))
            await until_queued(redis_client, count)

        current = holder.reservation_id
        for _ in tasks:
            await first.release(current)
            done, _ = await asyncio.wait(
                [t for t in tasks if not t.done()], return_when=asyncio.FIRST_COMPLETED
            )
            current = next(iter(done)).result().reservation_id
        await first.release(current)
        assert order == ["high-1", "high-2", "low-1", "low-2"]


async def test_aging_lets_a_low_waiter_through_sustained_high_load(
    quotad: QuotadFactory, redis_client: aioredis.Redis
) -> None:
    policy = POLICY.replace("aging: 1h, heartbeat: 5s", "aging: 300ms, heartbeat: 1s").replace(
        "max_line: 3", "max_line: 100"
    )
    async with quotad(policy) as q:
        holder = await q.reserve(subject="holder")
        low = asyncio.ensure_future(q.reserve(subject="low", priority=LOW, max_wait=seconds(8)))
        await until_queued(redis_client, 1)
        highs_admitted_first = 0
        stop = asyncio.Event()

        async def high_user(index: int) -> None:
            nonlocal highs_admitted_first
            response = await q.reserve(subject=f"high-{index}", priority=HIGH, max_wait=seconds(8))
            if response.decision == pb.DECISION_ALLOWED:
                highs_admitted_first += not low.done()
                await asyncio.sleep(0.03)
                await q.release(response.reservation_id)

        async def high_load() -> None:  # a new HIGH waiter every 40 ms, each holding the slot 30 ms
            index = 0
            users = []
            while not stop.is_set():
                users.append(asyncio.ensure_future(high_user(index)))
                index += 1
                await asyncio.sleep(0.04)
            await asyncio.gather(*users)

        load = asyncio.ensure_future(high_load())
        await asyncio.sleep(0.1)
        await q.release(holder.reservation_id)
        response = await low
        stop.set()
        await q.release(response.reservation_id)
        await load
        assert response.decision == pb.DECISION_ALLOWED
        assert highs_admitted_first >= 2  # HIGH went first while LOW was young...
        assert waited_s(response) < 3  # ...and LOW was not starved: it aged past new HIGH arrivals


async def test_a_cancelled_waiter_leaves_the_line_with_nothing_reserved(
    quotad: QuotadFactory, redis_client: aioredis.Redis
) -> None:
    async with quotad(POLICY, subject="alice") as q:
        holder = await q.reserve()
        request = pb.CheckAndReserveRequest(subject="bob", max_wait=seconds(8))
        error = await rpc_error(q.stub.CheckAndReserve(request, timeout=0.5))
        assert error.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        deadline = time.monotonic() + 2
        while await line_length(redis_client) or await redis_client.keys("*:w:*"):
            assert time.monotonic() < deadline, "the cancelled waiter's place was not given up"
            await asyncio.sleep(0.01)
        await q.release(holder.reservation_id)
        assert await q.usage() == {"slots": 1}  # nothing leaked: the slot is free again
        assert (await q.reserve()).decision == pb.DECISION_ALLOWED


async def test_a_full_line_denies_at_once(quotad: QuotadFactory, redis_client: aioredis.Redis) -> None:
    async with quotad(POLICY) as q:
        holder = await q.reserve(subject="holder")
        waiters = [asyncio.ensure_future(q.reserve(subject=f"w{i}", max_wait=seconds(8))) for i in range(3)]
        await until_queued(redis_client, 3)
        started = time.monotonic()
        full = await q.reserve(subject="late", max_wait=seconds(8))
        assert full.decision == pb.DECISION_DENIED
        assert full.deny_reason == pb.DENY_REASON_QUEUE_FULL
        assert time.monotonic() - started < 1
        for _ in waiters:
            await q.release(holder.reservation_id)
            done, _ = await asyncio.wait(
                [w for w in waiters if not w.done()], return_when=asyncio.FIRST_COMPLETED
            )
            holder = next(iter(done)).result()
        await q.release(holder.reservation_id)


async def test_max_wait_beyond_the_policy_cap_is_invalid(quotad: QuotadFactory) -> None:
    async with quotad(POLICY, subject="alice") as q:
        error = await rpc_error(q.reserve(max_wait=seconds(60)))
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "max_wait" in (error.details() or "")


async def test_a_dead_replicas_waiter_loses_its_place(
    quotad: QuotadFactory, redis_url: str, redis_client: aioredis.Redis, tmp_path: Path
) -> None:
    policy = POLICY.replace("heartbeat: 5s", "heartbeat: 200ms").replace("max_line: 3", "max_line: 10")
    (tmp_path / "policy.yaml").write_text(policy.replace("\n    ", "\n"))
    address = f"127.0.0.1:{free_port()}"
    env = {**os.environ, "QUOTAD_POLICY": str(tmp_path / "policy.yaml"), "QUOTAD_LISTEN": address,
           "QUOTAD_REDIS_URL": redis_url, "QUOTAD_LOG_LEVEL": "warning"}  # fmt: skip
    doomed = subprocess.Popen([sys.executable, "-m", "quotad_server", "serve"], env=env)  # noqa: ASYNC220
    try:
        async with quotad(policy) as q:
            holder = await q.reserve(subject="holder")
            async with grpc.aio.insecure_channel(address) as channel:
                await asyncio.wait_for(channel.channel_ready(), 20)
                stub = pb_grpc.QuotaServiceStub(channel)
                request = pb.CheckAndReserveRequest(subject="doomed", priority=HIGH, max_wait=seconds(8))
                first_in_line: Awaitable[pb.CheckAndReserveResponse] = stub.CheckAndReserve(request)
                await until_queued(redis_client, 1)
                survivor = asyncio.ensure_future(
                    q.reserve(subject="survivor", priority=LOW, max_wait=seconds(8))
                )
                await until_queued(redis_client, 2)
                os.kill(doomed.pid, signal.SIGKILL)  # no goodbye: its ticket just stops being renewed
                with pytest.raises(grpc.aio.AioRpcError):
                    await first_in_line
            await q.release(holder.reservation_id)
            response = await survivor
            assert response.decision == pb.DECISION_ALLOWED
            assert waited_s(response) < 3
    finally:
        doomed.kill()
        doomed.wait()


async def test_lines_left_by_silent_waiters_expire_on_their_own(
    quotad: QuotadFactory, redis_client: aioredis.Redis
) -> None:
    policy = POLICY.replace("heartbeat: 5s", "heartbeat: 100ms")
    async with quotad(policy, subject="alice") as q:
        holder = await q.reserve()
        # A waiter takes its place, then goes silent for good (its replica is gone): the same
        # script call a waiting replica makes, never renewed.
        assert q.core is not None
        plan = q.core.plan_for(ReserveRequest(subject="ghost"), 0)
        denied = await q.store.reserve(replace(plan, ticket="deadbeef", enqueue=True))
        assert not denied.allowed
        assert denied.line
        assert await line_length(redis_client) == 1
        deadline = time.monotonic() + 3
        while await redis_client.keys("*:q") or await redis_client.keys("*:lines"):
            assert time.monotonic() < deadline, "an abandoned line stayed in Redis"
            await asyncio.sleep(0.05)
        await q.release(holder.reservation_id)

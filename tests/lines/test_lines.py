"""Waiting lines under load, on three replicas of one Redis: the order every replica and the script
share, no head-of-line blocking, no orphaned reservations, live places only, prompt wake-ups.

The heartbeat is long (5 s) wherever a test measures a wake-up, so that a waiter left to its
heartbeat shows as seconds, and a wake-up as about one RPC.
"""

from __future__ import annotations

import asyncio
import os
import random
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import replace
from pathlib import Path

import grpc
import pytest
import redis.asyncio as aioredis
from google.protobuf import duration_pb2
from quotad.v1 import quota_pb2 as pb
from quotad.v1 import quota_pb2_grpc as pb_grpc
from quotad_server.core import ReserveRequest
from quotad_server.model import Priority
from quotad_server.store.embedded import EmbeddedRedis, free_port

from tests.conftest import Quotad, running_quotad

LOW, HIGH = pb.PRIORITY_LOW, pb.PRIORITY_HIGH


def policy(*, slots: int, aging: str, heartbeat: str = "5s", max_line: int = 1000, caps: bool = False) -> str:
    """One global concurrency limit; with `caps`, LOW may fill 60% of it and NORMAL 85%."""
    admission = "admission: {low: 0.6, normal: 0.85, high: 1.0}" if caps else ""
    return f"""
    defaults: {{tier: app}}
    {admission}
    leases: {{default: 60s, min: 1s, max: 15m}}
    waiting: {{max_wait: 10s, max_line: {max_line}, aging: {aging}, heartbeat: {heartbeat}}}
    tiers:
      app: {{limits: []}}
    global:
      limits:
        - {{name: slots, metric: concurrent, limit: {slots}}}
"""


def seconds(value: float) -> duration_pb2.Duration:
    duration = duration_pb2.Duration()
    duration.FromNanoseconds(int(value * 1e9))
    return duration


@asynccontextmanager
async def replicas(policy_yaml: str, redis_url: str, count: int = 3) -> AsyncIterator[list[Quotad]]:
    async with AsyncExitStack() as stack:
        yield [await stack.enter_async_context(running_quotad(policy_yaml, redis_url)) for _ in range(count)]


async def places(client: aioredis.Redis) -> int:
    """Places taken in every waiting line, live or not."""
    return sum([await client.zcard(line) for line in await client.keys("*:q")])


async def until_places(client: aioredis.Redis, count: int) -> None:
    deadline = time.monotonic() + 10
    while True:
        if await places(client) == count:
            return
        assert time.monotonic() < deadline, f"expected {count} places in line, found {await places(client)}"
        await asyncio.sleep(0.01)


async def slots_free(q: Quotad) -> int:
    return (await q.usage(subject="anyone"))["slots"]


async def hold(q: Quotad, count: int, priority: pb.Priority.ValueType = HIGH) -> list[str]:
    ids = []
    for index in range(count):
        response = await q.reserve(subject=f"holder-{index}", priority=priority)
        assert response.decision == pb.DECISION_ALLOWED
        ids.append(response.reservation_id)
    return ids


@pytest.fixture
async def clean(redis_server: EmbeddedRedis) -> AsyncIterator[aioredis.Redis]:
    client = aioredis.Redis.from_url(redis_server.url)
    await client.flushall()
    yield client
    await client.aclose()


async def test_a_waiter_capped_by_its_priority_holds_nobody_back(
    clean: aioredis.Redis, redis_server: EmbeddedRedis
) -> None:
    """Limit 10, 8 slots taken, an aged LOW waiter at the head of the line that cannot fit its
    60% cap: HIGH requests that fit are admitted at once, and the LOW waiter when it fits."""
    async with replicas(policy(slots=10, aging="100ms", caps=True), redis_server.url) as (a, b, c):
        holders = await hold(a, 8)
        low = asyncio.ensure_future(b.reserve(subject="low", priority=LOW, max_wait=seconds(8)))
        await until_places(clean, 1)
        await asyncio.sleep(0.3)  # LOW has waited past HIGH's boost (2 x aging): it heads the line

        fresh = await c.reserve(subject="fresh-high", priority=HIGH)
        assert fresh.decision == pb.DECISION_ALLOWED
        assert next(s.remaining for s in fresh.limits if s.name == "slots") == 1
        waiting = await a.reserve(subject="waiting-high", priority=HIGH, max_wait=seconds(3))
        assert waiting.decision == pb.DECISION_ALLOWED
        assert waiting.waited.ToMilliseconds() < 1000  # its first try (the heartbeat is 5 s)
        assert not low.done()

        # Down to 5 taken: LOW fits its cap (6) and is admitted without waiting for its heartbeat.
        for reservation_id in [*holders[:5], fresh.reservation_id]:
            await a.release(reservation_id)
        released = time.monotonic()
        response = await low
        assert response.decision == pb.DECISION_ALLOWED
        assert time.monotonic() - released < 1.0  # its heartbeat is 5 s


@pytest.mark.parametrize("same_replica", [True, False], ids=["same-replica", "other-replicas"])
async def test_a_release_wakes_the_aged_head_not_a_newer_high_waiter(
    clean: aioredis.Redis, redis_server: EmbeddedRedis, same_replica: bool
) -> None:
    """An aged LOW waiter heads the line and a HIGH waiter is behind it: a release admits the LOW
    waiter within about an RPC, and the next release the HIGH one, wherever each waits."""
    async with replicas(policy(slots=1, aging="100ms"), redis_server.url) as (a, b, c):
        (holder,) = await hold(c, 1)
        low = asyncio.ensure_future(a.reserve(subject="low", priority=LOW, max_wait=seconds(8)))
        await until_places(clean, 1)
        await asyncio.sleep(0.3)  # aged past HIGH's boost
        high_on = a if same_replica else b
        high = asyncio.ensure_future(high_on.reserve(subject="high", priority=HIGH, max_wait=seconds(8)))
        await until_places(clean, 2)

        await c.release(holder)
        released = time.monotonic()
        first = await low
        assert first.decision == pb.DECISION_ALLOWED
        assert time.monotonic() - released < 1.0
        assert not high.done()

        await c.release(first.reservation_id)
        released = time.monotonic()
        second = await high
        assert second.decision == pb.DECISION_ALLOWED
        assert time.monotonic() - released < 1.0


async def test_a_place_given_up_lets_the_next_waiter_try_at_once(
    clean: aioredis.Redis, redis_server: EmbeddedRedis
) -> None:
    """A silent waiter (a replica that took the place and stopped) claims the free slot ahead of a
    live waiter; when its place is given up, the live waiter is admitted without its heartbeat."""
    async with replicas(policy(slots=1, aging="1h"), redis_server.url, count=2) as (a, b):
        (holder,) = await hold(a, 1)
        assert a.core is not None
        plan = a.core.plan_for(ReserveRequest(subject="ghost", priority=Priority.HIGH), 0)
        ghost = await a.store.reserve(replace(plan, ticket="deadbeefdeadbeef", enqueue=True))
        assert not ghost.allowed
        live = asyncio.ensure_future(b.reserve(subject="live", priority=HIGH, max_wait=seconds(8)))
        await until_places(clean, 2)
        await a.release(holder)  # the ghost, ranked first, claims the slot: the live waiter waits
        await asyncio.sleep(0.2)
        assert not live.done()

        await a.store.leave_line(plan.partition, "deadbeefdeadbeef")
        left = time.monotonic()
        response = await live
        assert response.decision == pb.DECISION_ALLOWED
        assert time.monotonic() - left < 1.0  # the heartbeat is 5 s: the leave woke it


async def test_no_reservation_is_orphaned_when_deadlines_equal_max_wait(
    clean: aioredis.Redis, redis_server: EmbeddedRedis
) -> None:
    """A flood whose callers give up exactly when their wait would end: every admission reaches
    its caller, or is undone. Every caller releases what it got; afterwards nothing is held."""
    rng = random.Random(20)
    async with replicas(policy(slots=3, aging="200ms", heartbeat="1s", caps=True), redis_server.url) as stubs:
        codes: Counter[str] = Counter()
        done = asyncio.Event()

        async def caller(index: int) -> None:
            q = stubs[index % 3]
            n = 0
            while not done.is_set():
                n += 1
                wait = rng.choice([0.1, 0.2, 0.3])
                request = pb.CheckAndReserveRequest(
                    subject=f"c{index}-{n}", priority=rng.choice([LOW, HIGH]), max_wait=seconds(wait)
                )
                try:
                    response = await q.stub.CheckAndReserve(request, timeout=wait)
                except grpc.aio.AioRpcError as error:
                    codes[error.code().name] += 1
                    continue
                if response.decision == pb.DECISION_ALLOWED:
                    codes["ALLOWED"] += 1
                    await asyncio.sleep(0.03)
                    await q.release(response.reservation_id)
                else:
                    codes["DENIED"] += 1

        callers = [asyncio.ensure_future(caller(index)) for index in range(12)]
        await asyncio.sleep(3)
        done.set()
        await asyncio.gather(*callers)
        for q in stubs:
            await asyncio.wait_for(q.store.quiesce(), 30)  # every late reply heard, every undo done
        assert codes["ALLOWED"] > 0, codes
        assert codes["DEADLINE_EXCEEDED"] > 0, codes  # the race this test is about happened
        assert set(codes) <= {"ALLOWED", "DENIED", "DEADLINE_EXCEEDED"}, codes
        assert await slots_free(stubs[0]) == 3, f"orphaned reservations hold slots ({codes})"


async def test_a_dead_replicas_places_do_not_fill_the_line(
    clean: aioredis.Redis, redis_server: EmbeddedRedis, tmp_path: Path
) -> None:
    """max_line 5; a replica holding 4 places dies. Once its places expire (3 heartbeats), new
    waiters take places again, although the limit stays full and nobody was admitted."""
    yaml = policy(slots=1, aging="1h", heartbeat="200ms", max_line=5)
    (tmp_path / "policy.yaml").write_text(yaml.replace("\n    ", "\n"))
    address = f"127.0.0.1:{free_port()}"
    env = {**os.environ, "QUOTAD_POLICY": str(tmp_path / "policy.yaml"), "QUOTAD_LISTEN": address,
           "QUOTAD_REDIS_URL": redis_server.url, "QUOTAD_LOG_LEVEL": "warning"}  # fmt: skip
    doomed = subprocess.Popen([sys.executable, "-m", "quotad_server", "serve"], env=env)  # noqa: ASYNC220
    try:
        async with replicas(yaml, redis_server.url, count=1) as (a,):
            await hold(a, 1)
            alive = asyncio.ensure_future(a.reserve(subject="alive", max_wait=seconds(8)))
            await until_places(clean, 1)
            async with grpc.aio.insecure_channel(address) as channel:
                await asyncio.wait_for(channel.channel_ready(), 30)
                stub = pb_grpc.QuotaServiceStub(channel)
                doomed_calls = [
                    asyncio.ensure_future(
                        stub.CheckAndReserve(pb.CheckAndReserveRequest(subject=f"d{i}", max_wait=seconds(8)))
                    )
                    for i in range(4)
                ]
                await until_places(clean, 5)
                full = await a.reserve(subject="late", max_wait=seconds(1))
                assert full.deny_reason == pb.DENY_REASON_QUEUE_FULL
                os.kill(doomed.pid, signal.SIGKILL)  # no goodbye: its places just stop being renewed
                await asyncio.gather(*doomed_calls, return_exceptions=True)
            await _only_live_places(clean)  # 3 heartbeats after the kill
            probes = [
                asyncio.ensure_future(a.reserve(subject=f"p{i}", max_wait=seconds(1))) for i in range(4)
            ]
            await until_places(clean, 5)  # the dead places are gone and four new ones taken
            for probe in await asyncio.gather(*probes):
                assert probe.deny_reason != pb.DENY_REASON_QUEUE_FULL
            alive.cancel()
    finally:
        doomed.kill()
        doomed.wait()


async def _only_live_places(client: aioredis.Redis) -> None:
    """Wait until one ticket is left: the live waiter's (the dead replica's expire unrenewed)."""
    deadline = time.monotonic() + 10
    while True:
        if len(await client.keys("*:w:*")) == 1:
            return
        assert time.monotonic() < deadline, "the dead replica's tickets did not expire"
        await asyncio.sleep(0.05)


@pytest.mark.parametrize("aging", ["250ms", "1h"], ids=["aging-on", "aging-off"])
async def test_high_keeps_its_share_and_low_progresses_with_aging(
    clean: aioredis.Redis, redis_server: EmbeddedRedis, aging: str
) -> None:
    """One slot, a LOW flood of six callers and two HIGH callers, on three replicas, for 3 s.
    HIGH gets nearly all of its calls admitted, with aging on and off; with aging on, LOW, which
    has waited past HIGH's boost, is admitted too, and nothing sits idle for a heartbeat."""
    async with replicas(policy(slots=1, aging=aging), redis_server.url) as stubs:
        tried: Counter[str] = Counter()
        admitted: Counter[str] = Counter()
        done = asyncio.Event()

        async def caller(index: int, priority: pb.Priority.ValueType, pause_s: float) -> None:
            q = stubs[index % 3]
            name = pb.Priority.Name(priority)
            n = 0
            while not done.is_set():
                n += 1
                tried[name] += 1
                request = pb.CheckAndReserveRequest(
                    subject=f"{name}-{index}-{n}", priority=priority, max_wait=seconds(3)
                )
                response = await q.stub.CheckAndReserve(request, timeout=10)
                if response.decision == pb.DECISION_ALLOWED:
                    admitted[name] += 1
                    await asyncio.sleep(0.05)
                    await q.release(response.reservation_id)
                await asyncio.sleep(pause_s)

        callers = [asyncio.ensure_future(caller(i, LOW, 0.0)) for i in range(6)]
        callers += [asyncio.ensure_future(caller(i, HIGH, 0.15)) for i in range(2)]
        await asyncio.sleep(3)
        done.set()
        await asyncio.gather(*callers)
        high_share = admitted["PRIORITY_HIGH"] / tried["PRIORITY_HIGH"]
        assert high_share >= 0.9, (tried, admitted)
        # One slot held 50 ms a call: about 60 admissions in 3 s. A heartbeat's idleness (5 s) would show.
        assert admitted.total() >= 25, (tried, admitted)
        if aging != "1h":
            assert admitted["PRIORITY_LOW"] >= 5, (tried, admitted)

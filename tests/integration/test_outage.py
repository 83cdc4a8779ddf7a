"""Redis stopped or gone mid-test: UNAVAILABLE within the bounded timeout, nothing changed, recovery."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest
import redis.asyncio as aioredis
from grpc_health.v1 import health_pb2, health_pb2_grpc
from quotad.v1 import quota_pb2 as pb
from quotad_server.store.embedded import EmbeddedRedis, free_port

from tests.conftest import Quotad, rpc_error, running_quotad, snapshot

POLICY = """
    defaults: {tier: t}
    tiers:
      t:
        limits:
          - {name: tpm, metric: total_tokens, limit: 1000, period: 1m}
          - {name: in-flight, metric: concurrent, limit: 5}
"""
TIMEOUT_S = 0.25
FAST_S = 1.5  # the timeout plus generous scheduling slack on a loaded 2-core machine


@pytest.fixture
def own_redis() -> Iterator[EmbeddedRedis]:
    """A Redis of this test's own, so stopping it leaves the session's alone."""
    with EmbeddedRedis() as server:
        yield server


@pytest.fixture
async def q(own_redis: EmbeddedRedis) -> AsyncIterator[Quotad]:
    async with running_quotad(POLICY, own_redis.url, timeout_s=TIMEOUT_S, subject="alice") as running:
        yield running


async def _health(q: Quotad) -> int:
    stub: Any = health_pb2_grpc.HealthStub(q.channel)  # the typeshed stub knows only sync channels
    response = await stub.Check(health_pb2.HealthCheckRequest(service="quotad.v1.QuotaService"), timeout=5)
    status: int = response.status
    return status


async def _wait_for_health(q: Quotad, status: int) -> None:
    deadline = time.monotonic() + 5
    while await _health(q) != status:
        assert time.monotonic() < deadline, f"health did not become {status}"
        await asyncio.sleep(0.02)


async def test_paused_redis_gives_unavailable_fast_and_reserves_nothing(
    q: Quotad, own_redis: EmbeddedRedis
) -> None:
    assert own_redis.process is not None
    reserved = await q.reserve(input_tokens=100)
    client = aioredis.Redis.from_url(own_redis.url)
    before = await snapshot(client)

    os.kill(own_redis.process.pid, signal.SIGSTOP)
    try:
        for call in (
            q.reserve(input_tokens=200),
            q.commit(reserved.reservation_id, input_tokens=1, output_tokens=1),
            q.release(reserved.reservation_id),
        ):
            started = time.monotonic()
            error = await rpc_error(call)
            assert error.code().name == "UNAVAILABLE"
            assert time.monotonic() - started < FAST_S
        await asyncio.sleep(TIMEOUT_S * 2)  # the scripts' deadlines pass while Redis is paused
    finally:
        os.kill(own_redis.process.pid, signal.SIGCONT)

    # Redis now runs the scripts it had received: each sees its caller's deadline passed and writes nothing.
    await asyncio.sleep(0.1)
    assert await snapshot(client) == before
    await client.aclose()
    assert (await q.usage())["in-flight"] == 4  # only the first reservation holds a slot


async def test_killed_redis_gives_unavailable_then_recovers(q: Quotad, own_redis: EmbeddedRedis) -> None:
    await _wait_for_health(q, health_pb2.HealthCheckResponse.SERVING)
    port = own_redis.port
    own_redis.stop()

    started = time.monotonic()
    error = await rpc_error(q.reserve(input_tokens=100))
    assert error.code().name == "UNAVAILABLE"
    assert time.monotonic() - started < FAST_S
    error = await rpc_error(q.stub.GetUsage(pb.GetUsageRequest(subject="alice"), timeout=5))
    assert error.code().name == "UNAVAILABLE"
    await _wait_for_health(q, health_pb2.HealthCheckResponse.NOT_SERVING)

    own_redis.port = port
    own_redis.start()
    await _wait_for_health(q, health_pb2.HealthCheckResponse.SERVING)
    assert (await q.reserve(input_tokens=100)).decision == pb.DECISION_ALLOWED


async def test_full_redis_gives_unavailable_and_writes_nothing(q: Quotad, own_redis: EmbeddedRedis) -> None:
    """maxmemory reached with noeviction: writes that need memory are refused. An outage, not a bug.

    (A Release, or a Commit whose refund empties a bucket, deletes before it writes; Redis lets a
    script that has written finish, so those may complete, atomically all the same.)
    """
    reserved = await q.reserve(input_tokens=100)
    client = aioredis.Redis.from_url(own_redis.url)
    before = await snapshot(client)
    await client.config_set("maxmemory-policy", "noeviction")
    await client.config_set("maxmemory", 1)
    try:
        for call in (
            q.reserve(input_tokens=200),
            q.commit(reserved.reservation_id, input_tokens=120, output_tokens=10),  # a bucket stays
        ):
            error = await rpc_error(call)
            assert error.code().name == "UNAVAILABLE"
            assert "out of memory" in (error.details() or "")
        assert await snapshot(client) == before
    finally:
        await client.config_set("maxmemory", 0)
    assert (await q.reserve(input_tokens=200)).decision == pb.DECISION_ALLOWED
    await client.aclose()


async def test_demoted_redis_gives_unavailable_then_quotad_reconnects(
    q: Quotad, own_redis: EmbeddedRedis
) -> None:
    """A failover made the server a replica: READONLY. quotad answers UNAVAILABLE and opens a new
    connection for the next call, which (behind a DNS name or a Service) reaches the new primary."""
    reserved = await q.reserve(input_tokens=100)
    client = aioredis.Redis.from_url(own_redis.url)
    before = await snapshot(client)
    connections = int((await client.info("stats"))["total_connections_received"])
    dead_primary = free_port()  # nothing listens there: the replica keeps its data and serves reads
    await client.replicaof("127.0.0.1", dead_primary)
    try:
        for call in (
            q.reserve(input_tokens=200),
            q.commit(reserved.reservation_id, input_tokens=1, output_tokens=1),
        ):
            error = await rpc_error(call)
            assert error.code().name == "UNAVAILABLE"
            assert "read-only replica" in (error.details() or "")
        assert await snapshot(client) == before
    finally:
        await client.replicaof("NO", "ONE")  # promoted back: the primary again
    assert (await q.reserve(input_tokens=200)).decision == pb.DECISION_ALLOWED
    # Each READONLY answer dropped quotad's connection; each next call opened a new one.
    assert int((await client.info("stats"))["total_connections_received"]) >= connections + 2
    await client.aclose()

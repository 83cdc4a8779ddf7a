"""Health stays NOT_SERVING until the tokenizers are loaded; then it follows Redis."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import grpc
import redis.asyncio as aioredis
from grpc_health.v1 import health_pb2, health_pb2_grpc
from quotad.v1 import quota_pb2 as pb
from quotad.v1 import quota_pb2_grpc as pb_grpc
from quotad_server.core import QuotaCore
from quotad_server.policy import parse_policy
from quotad_server.server import QuotadServer
from quotad_server.store.embedded import EmbeddedRedis
from quotad_server.store.redis import RedisStore

from tests.conftest import encodings

POLICY = "defaults: {tier: t}\nmodels: {gpt-4o: {}}\ntiers: {t: {limits: []}}\n"


async def test_not_serving_until_the_encodings_are_loaded(redis_server: EmbeddedRedis) -> None:
    store = RedisStore.from_url(redis_server.url, timeout_s=0.25)
    await store.start()
    core = QuotaCore(parse_policy(POLICY, "p.yaml"), store)  # no encodings yet
    server = QuotadServer(core, store, listen="127.0.0.1:0", health_interval_s=0.02)
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            health: Any = health_pb2_grpc.HealthStub(channel)
            stub = pb_grpc.QuotaServiceStub(channel)

            async def status() -> int:
                reply = await health.Check(
                    health_pb2.HealthCheckRequest(service="quotad.v1.QuotaService"), timeout=5
                )
                result: int = reply.status
                return result

            await asyncio.sleep(0.1)  # several health checks: Redis answers, yet not serving
            assert await status() == health_pb2.HealthCheckResponse.NOT_SERVING
            request = pb.CheckAndReserveRequest(subject="a", model="gpt-4o", prompt="hello")
            error = None
            try:
                await stub.CheckAndReserve(request, timeout=5)
            except grpc.aio.AioRpcError as raised:
                error = raised
            assert error is not None
            assert error.code() == grpc.StatusCode.UNAVAILABLE

            core.encodings = encodings()
            deadline = time.monotonic() + 5
            while await status() != health_pb2.HealthCheckResponse.SERVING:
                assert time.monotonic() < deadline
                await asyncio.sleep(0.02)
            assert (await stub.CheckAndReserve(request, timeout=5)).counted_input_tokens == 1
    finally:
        await server.stop(0)
        await store.aclose()


async def test_eviction_policy_is_read_and_never_in_the_way(redis_server: EmbeddedRedis) -> None:
    """The start-up eviction check reads INFO; a user whose ACL denies INFO gets no answer, not an error."""
    admin = aioredis.Redis.from_url(redis_server.url)
    store = RedisStore.from_url(redis_server.url, timeout_s=1)
    denied_url = redis_server.url.replace("redis://", "redis://no-info:secret@")
    denied = RedisStore.from_url(denied_url, timeout_s=1)
    try:
        assert await store.eviction_policy() == "noeviction"  # Valkey's default
        assert await store.cluster_shards() == 0  # not a Redis Cluster
        await admin.acl_setuser(
            "no-info", enabled=True, passwords=["+secret"], keys=["*"], commands=["+@all", "-info"]
        )
        await denied.start()  # an ordinary user otherwise
        assert await denied.eviction_policy() is None
        assert await denied.cluster_shards() is None
    finally:
        await admin.acl_deluser("no-info")
        await admin.aclose()
        await store.aclose()
        await denied.aclose()

"""Redis Cluster: a cluster of one shard serves; on one of several, a decision whose keys live elsewhere
answers UNAVAILABLE and changes nothing (quotad's client talks to one server)."""

from __future__ import annotations

import redis.asyncio as aioredis
from quotad.v1 import quota_pb2 as pb
from quotad_server.store.embedded import EmbeddedRedis
from quotad_server.store.redis import RedisStore, hash_tag

from tests.conftest import redis_cluster, rpc_error, running_quotad, snapshot

POLICY = """
    defaults: {tier: t}
    tiers:
      t:
        limits:
          - {name: tpm, metric: total_tokens, limit: 100000, period: 1m}
"""
TENANTS = [f"acme-{i}" for i in range(40)]


async def _slot_owner(nodes: list[EmbeddedRedis], tenant: str) -> int:
    """The index of the node that serves the slot of `tenant`'s keys (its partition's hash tag)."""
    client = aioredis.Redis.from_url(nodes[0].url)
    try:
        slot = int(await client.cluster("KEYSLOT", "{" + hash_tag(f"t:{tenant}") + "}"))
    finally:
        await client.aclose()
    return slot * len(nodes) // 16384  # redis_cluster splits the slots evenly, in node order


async def test_a_cluster_of_one_shard_serves_every_tenant() -> None:
    with redis_cluster(1) as nodes:
        store = RedisStore.from_url(nodes[0].url, timeout_s=1)
        try:
            assert await store.cluster_shards() == 1
        finally:
            await store.aclose()
        async with running_quotad(POLICY, nodes[0].url, timeout_s=1, subject="alice") as q:
            for tenant in TENANTS[:5]:
                response = await q.reserve(tenant=tenant, input_tokens=10)
                assert response.decision == pb.DECISION_ALLOWED


async def test_on_a_cluster_of_two_shards_a_moved_decision_is_unavailable_and_writes_nothing(
    two_shard_cluster: list[EmbeddedRedis],
) -> None:
    nodes = two_shard_cluster
    owners = {tenant: await _slot_owner(nodes, tenant) for tenant in TENANTS}
    here = next(t for t, owner in owners.items() if owner == 0)
    elsewhere = next(t for t, owner in owners.items() if owner == 1)
    store = RedisStore.from_url(nodes[0].url, timeout_s=1)
    clients = [aioredis.Redis.from_url(node.url) for node in nodes]
    try:
        assert await store.cluster_shards() == 2  # what `quotad serve` refuses at start
        async with running_quotad(POLICY, nodes[0].url, timeout_s=1, subject="alice") as q:
            assert (await q.reserve(tenant=here, input_tokens=10)).decision == pb.DECISION_ALLOWED
            before = [await snapshot(client) for client in clients]
            error = await rpc_error(q.reserve(tenant=elsewhere, input_tokens=10))
            assert error.code().name == "UNAVAILABLE"
            assert "Redis Cluster" in (error.details() or "")
            assert [await snapshot(client) for client in clients] == before
            # The connection stays usable for the tenants this node serves.
            assert (await q.reserve(tenant=here, input_tokens=10)).decision == pb.DECISION_ALLOWED
    finally:
        await store.aclose()
        for client in clients:
            await client.aclose()

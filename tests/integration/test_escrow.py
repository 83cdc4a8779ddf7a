"""Escrow: a global limit split into per-partition slices follows the demand, exactly.

Every test runs real quotad servers (grpc.aio) on the session's real Valkey, with the
injected clock frozen unless a test moves it: what the slices admit is then checked to
the unit against the limit (a frozen token bucket refills nothing).
"""

from __future__ import annotations

import asyncio
import functools
import random
import textwrap
from collections.abc import Sequence
from contextlib import AsyncExitStack
from importlib import resources
from typing import Any

import pytest
import redis.asyncio as aioredis
from google.protobuf import duration_pb2
from quotad.v1 import quota_pb2 as pb
from quotad_server.core import MAX_PULL_BACKOFF, QuotaCore, ReserveRequest
from quotad_server.model import Algorithm, Limit
from quotad_server.policy import Policy, parse_policy
from quotad_server.store.embedded import EmbeddedRedis
from quotad_server.store.redis import RedisStore, hash_tag, key

from tests.conftest import (
    ManualClock,
    Quotad,
    QuotadFactory,
    redis_cluster,
    running_quotad,
    storm,
)
from tests.keyslot import key_slot

PARTITIONS = 8
CLIENTS = 8  # separate channels, as separate backends would be
# Long, so that the replicas' own recovery (every half timeout, on the loop's clock) stays out of
# the tests' way: they run it themselves, on the injected clock.
TRANSFER_TIMEOUT_S = 3600


def bucket_policy(limit: int, floor: float = 0.01) -> str:
    return f"""
        defaults: {{tier: t}}
        tiers: {{t: {{limits: [{{name: subject-rpm, metric: requests, limit: 100000, period: 1m}}]}}}}
        global:
          limits:
            - {{name: provider-tpm, metric: total_tokens, limit: {limit}, period: 1m}}
        escrow:
          {{partitions: {PARTITIONS}, floor: {floor}, rebalance_interval: 20ms, transfer_timeout: {TRANSFER_TIMEOUT_S}s}}
    """


def window_policy(limit: int) -> str:
    return f"""
        defaults: {{tier: t}}
        tiers: {{t: {{limits: []}}}}
        tenants: {{"*": {{limits: [{{name: tenant-rpm, metric: requests, limit: 100000, period: 1m}}]}}}}
        global:
          limits:
            - {{name: provider-rpm, metric: requests, limit: {limit}, period: 1m, algorithm: sliding_window}}
        escrow: {{partitions: {PARTITIONS}}}
    """


def _policy(q: Quotad) -> tuple[Policy, Limit]:
    assert q.core is not None
    policy = q.core.policy
    return policy, policy.global_limits[0] if policy.global_limits else policy.tenant_limits[BIG][0]


def tenant_of_another_partition(policy: Policy, tenant: str) -> str:
    """A tenant whose partition is not `tenant`'s."""
    return next(t for t in (f"t{i}" for i in range(100)) if policy.partition(t) != policy.partition(tenant))


BIG = "big co:eu"  # a tenant in escrow.tenants; its name has a space and a ':' to escape


def big_tenant_policy(limit: int) -> str:
    """One large tenant whose token bucket is split over the partitions, and no global limit."""
    return f"""
        defaults: {{tier: t}}
        tiers: {{t: {{limits: [{{name: subject-rpm, metric: requests, limit: 100000, period: 1m}}]}}}}
        tenants:
          "{BIG}":
            limits: [{{name: tenant-tpm, metric: total_tokens, limit: {limit}, period: 1m}}]
        escrow:
          partitions: {PARTITIONS}
          tenants: ["{BIG}"]
          rebalance_interval: 20ms
          transfer_timeout: {TRANSFER_TIMEOUT_S}s
    """


async def slice_capacity(client: aioredis.Redis, q: Quotad, partition: str) -> int:
    """A slice's capacity, once it has moved (see escrow.lua)."""
    raw = await client.get(q.store._slice_key(partition, _policy(q)[1]) + ":e")
    assert raw is not None
    return int(raw.split()[0])


async def slice_remaining(q: Quotad, tenant: str, subject: str = "s") -> int:
    """What the global limit's slice of `tenant`'s partition has left (GetUsage reports the whole)."""
    policy, limit = _policy(q)
    partition = policy.partition(tenant, subject)
    statuses = await q.store.peek(partition, tenant, subject, (limit,), int(partition.removeprefix("p:")))
    return statuses[0].remaining


async def capacity(
    client: aioredis.Redis, q: Quotad, limit: Limit | None = None, tenant: str = ""
) -> tuple[int, int]:
    """(the sum of the slices' capacities, the units in flight between slices) of the global
    limit, or of `limit` (of `tenant`, for a tenant limit)."""
    policy, limit = _policy(q) if limit is None else (_policy(q)[0], limit)
    assert policy.escrow is not None
    total = in_flight = 0
    for index, partition in enumerate(policy.escrow.partition_names()):
        raw = await client.get(q.store._slice_key(partition, limit, tenant) + ":e")
        if raw is not None:
            total += int(raw.split()[0])
        else:  # never moved: the even share
            total += limit.limit // PARTITIONS + (1 if index < limit.limit % PARTITIONS else 0)
        for record in (await client.hgetall(q.store._transfers_key(partition))).values():
            in_flight += int(record.split()[1])
    return total, in_flight


async def test_all_traffic_on_one_partition_fills_the_global_bucket_exactly(
    quotad: QuotadFactory, redis_client: aioredis.Redis
) -> None:
    limit = 20_000
    rng = random.Random(15)
    costs = [rng.randint(20, 300) for _ in range(400)]  # ~64,000 tokens asked for: 3x the limit
    async with quotad(bucket_policy(limit), clock=ManualClock(), tenant="hot") as q:
        requests = [
            pb.CheckAndReserveRequest(subject=f"s{i % 50}", tenant="hot", input_tokens=c)
            for i, c in enumerate(costs)
        ]
        loop = asyncio.get_running_loop()
        started = loop.time()
        responses = await storm([q], requests, CLIENTS)
        elapsed = loop.time() - started
        admitted = sum(c for c, r in zip(costs, responses, strict=True) if r.decision == pb.DECISION_ALLOWED)
        # The clock is frozen: nothing refills, so the limit bounds what was admitted, to the token.
        assert admitted <= limit
        assert admitted >= 0.95 * limit, (admitted, elapsed)
        assert await capacity(redis_client, q) == (limit, 0)  # no capacity lost or made up
        usage = await q.usage(subject="s0", tenant="hot")
        assert usage["provider-tpm"] == limit - admitted  # GetUsage: the whole limit, all slices
        floors = 7 * (limit // PARTITIONS // 100)  # what the other slices keep
        assert await slice_remaining(q, "hot", "s0") == limit - admitted - floors


async def test_a_large_tenants_limit_spreads_over_the_partitions_and_fills_exactly(
    redis_url: str, redis_client: aioredis.Redis
) -> None:
    """A tenant in escrow.tenants: its subjects decide in many partitions (slots), each charged to
    its partition's slice of the tenant's limit; together, from 3 replicas, they admit what one
    exact bucket would at most. (Utilisation of at least 95% is the one-subject test's: here every
    slice is busy and the clock is frozen, so what busy slices owe one another never frees.)"""
    limit = 20_000
    rng = random.Random(1505)
    costs = [rng.randint(20, 300) for _ in range(400)]  # ~64,000 tokens asked for: 3x the limit
    clock = ManualClock()
    async with AsyncExitStack() as stack:
        replicas = [
            await stack.enter_async_context(running_quotad(big_tenant_policy(limit), redis_url, clock=clock))
            for _ in range(3)
        ]
        policy, tenant_limit = _policy(replicas[0])
        assert tenant_limit.slices == PARTITIONS
        subjects = [f"user-{i % 40}" for i in range(len(costs))]
        assert len({policy.partition(BIG, s) for s in subjects}) >= PARTITIONS - 1
        requests = [
            pb.CheckAndReserveRequest(subject=s, tenant=BIG, input_tokens=c)
            for s, c in zip(subjects, costs, strict=True)
        ]
        responses = await storm(replicas, requests, CLIENTS)
        admitted = sum(c for c, r in zip(costs, responses, strict=True) if r.decision == pb.DECISION_ALLOWED)
        assert admitted <= limit  # the clock is frozen: nothing refills
        assert admitted >= 0.5 * limit  # measured 76-99%: what busy slices owe stays owed here
        assert await capacity(redis_client, replicas[0], tenant_limit, BIG) == (limit, 0)
        # Another tenant is untouched by the big one's slices: a limit of its own, whole.
        assert (await replicas[1].reserve(subject="x", tenant="small")).decision == pb.DECISION_ALLOWED


async def test_all_of_a_large_tenants_traffic_on_one_subject_fills_its_limit(
    quotad: QuotadFactory, redis_client: aioredis.Redis
) -> None:
    """Even when all of a spread tenant's traffic comes from one subject (one partition), the
    other slices' unused capacity moves to it: at least 95% of the tenant's limit, exactly; a
    refund goes back to the slice charged, and the capacity left in flight by a replica that
    dies mid-transfer comes back after the timeout (the tenant's escaped slice keys included)."""
    limit = 8_000
    clock = ManualClock()
    async with quotad(big_tenant_policy(limit), clock=clock, subject="only", tenant=BIG) as q:
        assert q.core is not None
        policy, tenant_limit = _policy(q)
        admitted, held = 0, []
        while (response := await q.reserve(input_tokens=100)).decision == pb.DECISION_ALLOWED:
            admitted += 100
            held.append(response.reservation_id)
        assert 0.95 * limit <= admitted <= limit
        assert await capacity(redis_client, q, tenant_limit, BIG) == (limit, 0)
        before = (await q.usage(tenant=BIG))["tenant-tpm"]
        await q.commit(held[0], 40, 0)  # 60 back to this subject's slice
        assert (await q.usage(tenant=BIG))["tenant-tpm"] == before + 60
        # A replica gives from a slice of another partition and dies: recovery gives it back.
        assert policy.escrow is not None
        mine = policy.escrow.partition_names().index(policy.partition(BIG, "only"))
        giver = (mine + 1) % PARTITIONS
        partition = policy.escrow.partition_names()[giver]
        keys = [q.store._slice_key(partition, tenant_limit, BIG), q.store._transfers_key(partition)]
        suffix = f"t:big co%3Aeu:B{PARTITIONS}:tenant-tpm"
        assert keys[0].endswith(":l:" + suffix)  # as reserve.lua's keys name the slice
        spec: list[str | int] = ["B", "t", limit, tenant_limit.period_us, giver, PARTITIONS]
        clock.advance(60)  # every slice drains: the giver has its floor to give
        give: list[str | int] = ["give", clock.now_us, *spec, 0, "dead", mine, limit, suffix, 0, 0]
        given = await _escrow(redis_client, keys, give)
        assert given > 0
        assert await capacity(redis_client, q, tenant_limit, BIG) == (limit - given, given)
        clock.advance(TRANSFER_TIMEOUT_S + 1)
        assert await q.core.recover_escrow() == given
        assert await capacity(redis_client, q, tenant_limit, BIG) == (limit, 0)


async def test_three_replicas_fill_a_global_window_exactly_from_one_partition(
    redis_url: str, redis_client: aioredis.Redis
) -> None:
    limit = 600
    clock = ManualClock()
    async with AsyncExitStack() as stack:
        replicas = [
            await stack.enter_async_context(running_quotad(window_policy(limit), redis_url, clock=clock))
            for _ in range(3)
        ]
        requests = [pb.CheckAndReserveRequest(subject=f"s{i}", tenant="hot") for i in range(2 * limit)]
        responses = await storm(replicas, requests, CLIENTS)
        admitted = sum(r.decision == pb.DECISION_ALLOWED for r in responses)
        assert admitted <= limit
        assert admitted >= 0.95 * limit
        assert await capacity(redis_client, replicas[0]) == (limit, 0)
        # Denials are answers with a bound: the slice's window frees within the period.
        denied = [r for r in responses if r.decision == pb.DECISION_DENIED]
        assert denied
        assert all(0 < r.retry_after.ToMicroseconds() <= 60_000_000 for r in denied)
        # A quiet partition still admits at once: it kept its floor (one unit here).
        other = tenant_of_another_partition(_policy(replicas[0])[0], "hot")
        cold = await replicas[1].reserve(subject="c", tenant=other)
        assert cold.decision == pb.DECISION_ALLOWED


async def test_capacity_follows_the_demand_to_another_partition(
    quotad: QuotadFactory, redis_client: aioredis.Redis
) -> None:
    limit = 8_000
    clock = ManualClock()
    async with quotad(bucket_policy(limit), clock=clock) as q:
        policy, _ = _policy(q)
        first = "hot"
        second = tenant_of_another_partition(policy, first)

        async def fill(tenant: str) -> int:
            admitted = 0
            while (
                await q.reserve(subject="s", tenant=tenant, input_tokens=100)
            ).decision == pb.DECISION_ALLOWED:
                admitted += 100
            return admitted

        assert await fill(first) >= 0.95 * limit
        assert await fill(second) == 0  # the first partition's slice is in use: nothing to move
        clock.advance(60)  # it drains: now it is unused, and the second partition's denial pulls it over
        assert policy.escrow is not None
        await asyncio.sleep(MAX_PULL_BACKOFF * policy.escrow.rebalance_interval_us / 1e6)  # the longest gap
        assert await fill(second) >= 0.95 * limit
        assert await capacity(redis_client, q) == (limit, 0)


async def test_refunds_go_back_to_the_slice_they_came_from(quotad: QuotadFactory) -> None:
    async with quotad(bucket_policy(8_000), clock=ManualClock(), subject="s", tenant="hot") as q:
        assert (await q.usage(tenant="hot"))["provider-tpm"] == 8_000
        before = await slice_remaining(q, "hot")  # this partition's slice before any transfer
        big = await q.reserve(input_tokens=5_000)  # more than the slice: it pulls capacity, then admits
        assert big.decision == pb.DECISION_ALLOWED
        grown = await slice_remaining(q, "hot")
        assert before == 8_000 // PARTITIONS
        # One pull brought it all but the others' floors (1% of their even share, 10 tokens each).
        assert grown == 8_000 - 7 * 10 - 5_000
        assert (await q.usage(tenant="hot"))["provider-tpm"] == 8_000 - 5_000
        await q.commit(big.reservation_id, 1_000, 0)  # 4,000 refunded to this slice
        assert await slice_remaining(q, "hot") == grown + 4_000
        small = await q.reserve(input_tokens=500)
        await q.release(small.reservation_id)
        assert await slice_remaining(q, "hot") == grown + 4_000
        assert (await q.usage(tenant="hot"))["provider-tpm"] == 8_000 - 1_000


async def test_retry_after_is_exact_on_the_slice_once_nothing_is_left_to_move(quotad: QuotadFactory) -> None:
    clock = ManualClock()
    async with quotad(bucket_policy(8_000), clock=clock, subject="s", tenant="hot") as q:
        while (response := await q.reserve(input_tokens=700)).decision == pb.DECISION_ALLOWED:
            pass
        wait_us = response.retry_after.ToMicroseconds()
        assert wait_us > 0
        clock.advance((wait_us - 1) / 1e6)
        assert (await q.reserve(input_tokens=700)).decision == pb.DECISION_DENIED
        clock.advance(1e-6)
        assert (await q.reserve(input_tokens=700)).decision == pb.DECISION_ALLOWED


ESCROW_LUA = (resources.files("quotad_server.store") / "lua" / "escrow.lua").read_text()


async def _escrow(client: aioredis.Redis, keys: list[str], args: list[str | int]) -> int:
    """Run one step of escrow.lua as a replica would, from another client."""
    reply = await client.eval(ESCROW_LUA, len(keys), *keys, *args)
    return int(reply[0])


async def _give(client: aioredis.Redis, q: Quotad, *, giver: int, taker: int, transfer: str, now: int) -> int:
    """The first step of a transfer, run as a replica that dies right after it would."""
    policy, limit = _policy(q)
    assert policy.escrow is not None
    partition = policy.escrow.partition_names()[giver]
    keys = [q.store._slice_key(partition, limit), q.store._transfers_key(partition)]
    code = "W" if limit.algorithm is Algorithm.SLIDING_WINDOW else "B"
    spec: list[str | int] = [code, "t", limit.limit, limit.period_us, giver, PARTITIONS]
    suffix = f"g:{code}{PARTITIONS}:provider-tpm"
    seen = limit.limit // PARTITIONS  # the taker's capacity, as the replica saw it
    args: list[str | int] = ["give", now, *spec, 0, transfer, taker, limit.limit, suffix, seen, seen]
    return await _escrow(client, keys, args)


async def _take(
    client: aioredis.Redis, q: Quotad, *, taker: int, transfer: str, units: int, created: int, now: int
) -> int:
    policy, limit = _policy(q)
    assert policy.escrow is not None
    partition = policy.escrow.partition_names()[taker]
    keys = [q.store._slice_key(partition, limit), q.store._mark_key(partition, transfer)]
    spec: list[str | int] = ["B", "t", limit.limit, limit.period_us, taker, PARTITIONS]
    timeout = policy.escrow.transfer_timeout_us
    return await _escrow(
        client, keys, ["take", now, *spec, transfer, units, limit.limit, created, timeout, 60_000]
    )


async def test_capacity_in_flight_comes_back_after_the_transfer_timeout(
    quotad: QuotadFactory, redis_client: aioredis.Redis
) -> None:
    limit = 8_000
    clock = ManualClock()
    async with quotad(bucket_policy(limit), clock=clock) as q:
        assert q.core is not None
        timeout_s = TRANSFER_TIMEOUT_S
        # A replica gives 1,000 from slice 1 to slice 2 and dies: the 1,000 are in no slice.
        given = await _give(redis_client, q, giver=1, taker=2, transfer="dead-give", now=clock.now_us)
        assert given == limit // PARTITIONS
        assert await capacity(redis_client, q) == (limit - given, given)
        assert await q.core.recover_escrow() == 0  # not yet past its timeout: it may still land
        clock.advance(timeout_s + 0.001)
        # Too late to land now; recovery gives it back to slice 1.
        assert (
            await _take(
                redis_client, q, taker=2, transfer="dead-give", units=given, created=START, now=clock.now_us
            )
            == 0
        )
        assert await q.core.recover_escrow() == given
        assert await capacity(redis_client, q) == (limit, 0)
        assert await q.core.recover_escrow() == 0  # once

        # A replica gives and takes, then dies before removing the record: the taker keeps it.
        given = await _give(redis_client, q, giver=3, taker=2, transfer="dead-take", now=clock.now_us)
        take = functools.partial(
            _take,
            redis_client,
            q,
            taker=2,
            transfer="dead-take",
            units=given,
            created=clock.now_us,
            now=clock.now_us,
        )
        assert await take() == given
        assert await take() == 0  # once
        assert await capacity(redis_client, q) == (limit, given)  # moved; only its record is left
        clock.advance(timeout_s + 0.001)
        assert await q.core.recover_escrow() == 0
        assert await capacity(redis_client, q) == (limit, 0)

        # Recovery cancels a transfer before a slow take lands: the take then does nothing.
        given = await _give(redis_client, q, giver=4, taker=2, transfer="slow-take", now=clock.now_us)
        created = clock.now_us
        clock.advance(timeout_s + 0.001)
        assert await q.core.recover_escrow() == given
        assert (
            await _take(
                redis_client, q, taker=2, transfer="slow-take", units=given, created=created, now=created
            )
            == 0
        )
        assert await capacity(redis_client, q) == (limit, 0)


START = 1_800_000_000_123_457


async def test_every_script_call_stays_on_one_slot(
    quotad: QuotadFactory, redis_client: aioredis.Redis
) -> None:
    """Each call's KEYS share one hash tag (one Redis Cluster slot), decisions spread over the
    partitions' slots, and the transfers between them are single-slot steps too."""
    policy_yaml = (
        bucket_policy(8_000)
        + """
        waiting: {max_wait: 2s, heartbeat: 1s}
    """
    )
    calls: list[list[str]] = []
    clock = ManualClock()
    async with quotad(policy_yaml, clock=clock, subject="s") as q:
        client = q.store._client
        run_script, run_scripts = client.run_script, client.run_scripts

        def one(script: Any, keys: list[str], *args: Any, **kwargs: Any) -> Any:
            calls.append(keys)
            return run_script(script, keys, *args, **kwargs)

        def many(script: Any, batch: Sequence[Any], **kwargs: Any) -> Any:
            calls.extend(call[0] for call in batch)
            return run_scripts(script, batch, **kwargs)

        client.run_script = one  # type: ignore[method-assign]
        client.run_scripts = many  # type: ignore[method-assign,assignment]
        tenants = [f"tenant-{i}" for i in range(20)]
        for tenant in tenants:
            response = await q.reserve(tenant=tenant, input_tokens=300)
            await q.commit(response.reservation_id, 100, 0)
            await q.usage(tenant=tenant)
        big = await q.reserve(tenant="hot", input_tokens=4_000)  # pulls from every other slice
        assert big.decision == pb.DECISION_ALLOWED
        await q.release(big.reservation_id)
        wait = duration_pb2.Duration()
        wait.FromMilliseconds(300)
        waiter = await q.reserve(tenant="hot", input_tokens=7_000, max_wait=wait)  # waits in line, in vain
        assert waiter.decision == pb.DECISION_DENIED
        assert q.core is not None
        given = await _give(redis_client, q, giver=5, taker=6, transfer="lost", now=clock.now_us)
        clock.advance(TRANSFER_TIMEOUT_S + 1)
        assert given > 0
        assert await q.core.recover_escrow() == given
    slots = [{key_slot(k) for k in keys} for keys in calls]
    assert all(len(s) == 1 for s in slots), [keys for keys, s in zip(calls, slots, strict=True) if len(s) > 1]
    assert len({next(iter(s)) for s in slots}) >= PARTITIONS  # the decisions spread over the partitions


async def test_the_partitions_spread_over_a_real_clusters_shards(
    two_shard_cluster: list[EmbeddedRedis],
) -> None:
    """The slots computed here are the cluster's, and the partitions' slots fall on every shard."""
    policy = parse_policy(
        textwrap.dedent(bucket_policy(8_000)).replace("partitions: 8", "partitions: 16"), "p.yaml"
    )
    assert policy.escrow is not None
    client = aioredis.Redis.from_url(two_shard_cluster[0].url)
    owners = set()
    try:
        for partition in policy.escrow.partition_names():
            slice_key = key("quotad", hash_tag(partition), "l", "g", "B16:provider-tpm")
            slot = int(await client.cluster("KEYSLOT", slice_key))
            assert slot == key_slot(slice_key)
            owners.add(slot * len(two_shard_cluster) // 16384)  # redis_cluster splits the slots evenly
    finally:
        await client.aclose()
    assert owners == set(range(len(two_shard_cluster)))


async def test_two_busy_partitions_converge_to_equal_shares(
    quotad: QuotadFactory, redis_client: aioredis.Redis
) -> None:
    """A busy slice gives nothing it uses, so a second busy partition would starve; instead the
    first owes it half the difference and yields it as its usage drains (see escrow.lua)."""
    limit, cost = 8_000, 50
    clock = ManualClock()
    policy_yaml = bucket_policy(limit).replace("rebalance_interval: 20ms", "rebalance_interval: 1ms")
    async with quotad(policy_yaml, clock=clock, subject="s") as q:
        policy, _ = _policy(q)
        first = "hot"
        second = tenant_of_another_partition(policy, first)

        async def fill(tenant: str) -> int:
            admitted = 0
            while (await q.reserve(tenant=tenant, input_tokens=cost)).decision == pb.DECISION_ALLOWED:
                admitted += cost
            await asyncio.sleep(0.012)  # past the replica's longest gap between two pulls
            return admitted

        total = await fill(first)
        assert total >= 0.95 * limit
        shares = {first: 0, second: 0}
        for step in range(30):  # three periods, both partitions asking all the time
            clock.advance(6)
            for tenant in (first, second) if step % 2 else (second, first):
                admitted = await fill(tenant)
                total += admitted
                if step >= 20:  # the last period
                    shares[tenant] += admitted
        assert total <= limit + 180 * limit // 60  # never more than one bucket of the limit admits
        capacities = [await slice_capacity(redis_client, q, policy.partition(t)) for t in (first, second)]
        assert await capacity(redis_client, q) == (limit, 0)
        assert min(capacities) >= 0.4 * limit, capacities  # two of eight slices: half each, less floors
        assert min(shares.values()) >= 0.4 * sum(shares.values()), shares
        assert sum(shares.values()) >= 0.95 * limit  # and the last period's refill was used


async def test_a_passing_request_does_not_halve_a_busy_partition(
    quotad: QuotadFactory, redis_client: aioredis.Redis
) -> None:
    """What a busy giver owes is at most what its taker asks: a request that passes by in another
    partition takes the busy partition's capacity for one request's cost, not half of it."""
    limit = 8_000
    clock = ManualClock()
    async with quotad(bucket_policy(limit), clock=clock, subject="s") as q:
        policy, _ = _policy(q)
        busy = "hot"
        passing = tenant_of_another_partition(policy, busy)
        while (await q.reserve(tenant=busy, input_tokens=50)).decision == pb.DECISION_ALLOWED:
            pass
        capacity_before = await slice_capacity(redis_client, q, policy.partition(busy))
        await asyncio.sleep(0.025)  # past the replica's gap between two pulls of a slice
        await q.reserve(tenant=passing, input_tokens=100)
        clock.advance(30)  # half the busy slice's usage drains
        await asyncio.sleep(0.025)
        admitted = 0
        while (await q.reserve(tenant=busy, input_tokens=50)).decision == pb.DECISION_ALLOWED:
            admitted += 50
        moved = capacity_before - await slice_capacity(redis_client, q, policy.partition(busy))
        assert admitted >= capacity_before // 2 - 100 - moved - 50


async def test_skew_on_a_real_three_shard_cluster_is_exact_and_spread() -> None:
    limit = 20_000
    policy = parse_policy(
        textwrap.dedent(bucket_policy(limit)).replace("partitions: 8", "partitions: 16"), "p"
    )
    clock = ManualClock()
    with redis_cluster(3) as nodes:
        seeds = "redis://" + ",".join(f"127.0.0.1:{node.port}" for node in nodes)
        store = RedisStore.cluster(seeds, timeout_s=2.0, clock=clock)  # valkey-glide's cluster client
        core = QuotaCore(policy, store)
        try:
            # A little traffic on every tenant, then a storm on one partition: exact, and spread.
            tenants = [f"tenant-{i}" for i in range(64)]
            for tenant in tenants:
                assert (
                    await core.check_and_reserve(ReserveRequest("s", tenant, input_tokens=10))
                ).reservation_id
            rng = random.Random(3)
            costs = [rng.randint(20, 300) for _ in range(300)]
            outcomes = await asyncio.gather(
                *(
                    core.check_and_reserve(ReserveRequest(f"s{i}", "hot", input_tokens=c))
                    for i, c in enumerate(costs)
                )
            )
            admitted = 10 * len(tenants) + sum(
                c for c, o in zip(costs, outcomes, strict=True) if o.reservation_id
            )
            assert admitted <= limit
            assert admitted >= 0.95 * limit
            for node in nodes:  # every shard decided some
                async with aioredis.Redis.from_url(node.url) as client:
                    info = await client.info("commandstats")
                assert info.get("cmdstat_evalsha", {}).get("calls", 0) > 0, node.url
        finally:
            await store.aclose()


@pytest.mark.parametrize("algorithm", ["token_bucket", "sliding_window"])
async def test_random_traffic_refunds_transfers_and_deaths_never_beat_one_exact_limit(
    redis_url: str, redis_client: aioredis.Redis, algorithm: str
) -> None:
    """Random reservations over every partition, commits below the estimate, releases, time
    passing, transfers cut short by a dying replica and recoveries: after every step the slices
    and the capacity in flight sum to the limit exactly, and every admission is one that a
    single exact limit (one bucket, or one window), fed the same reservations and refunds,
    would admit too."""
    limit, period_s = 5_000, 60
    clock = ManualClock()
    rng = random.Random(1515)
    policy_yaml = bucket_policy(limit).replace(
        f"limit: {limit}, period: 1m}}", f"limit: {limit}, period: 1m, algorithm: {algorithm}}}"
    )
    window = algorithm == "sliding_window"
    async with running_quotad(policy_yaml, redis_url, clock=clock) as q:
        assert q.core is not None
        core, policy = q.core, q.core.policy
        assert policy.global_limits[0].algorithm.value == algorithm
        tenants = [f"tenant-{i}" for i in range(24)]
        held: list[tuple[str, int]] = []  # (reservation id, tokens reserved)
        level = 0.0  # the single bucket's level
        charged: dict[str, tuple[int, int]] = {}  # the single window: reservation id -> (at, units)

        def in_window() -> int:
            return sum(units for at, units in charged.values() if at > clock.now_us - period_s * 1_000_000)

        for step in range(300):
            action = rng.random()
            if action < 0.55:
                cost = rng.randint(1, 400)
                outcome = await core.check_and_reserve(
                    ReserveRequest("s", rng.choice(tenants), input_tokens=cost)
                )
                if outcome.reservation_id:
                    if window:
                        assert in_window() + cost <= limit, step
                    else:
                        assert level + cost <= limit + 1e-6, (step, level, cost)
                    level += cost
                    held.append((outcome.reservation_id, cost))
                    charged[outcome.reservation_id] = (clock.now_us, cost)
            elif action < 0.85 and held:
                reservation_id, cost = held.pop(rng.randrange(len(held)))
                used = rng.choice([0, rng.randint(0, cost)])  # never above the estimate: no debt
                if used or rng.random() < 0.5:
                    await core.commit(reservation_id, used, 0)
                else:
                    await core.release(reservation_id)
                level = max(0.0, level - (cost - used))
                charged[reservation_id] = (charged[reservation_id][0], used)
            elif action < 0.95:
                seconds = rng.choice([0.001, 0.5, 3, 20])
                clock.advance(seconds)
                level = max(0.0, level - seconds * limit / period_s)
                await asyncio.sleep(0.021)  # past the replica's gap between pulls, now and then
            else:  # a replica gives and dies; recovery later gives it back
                giver, taker = rng.sample(range(PARTITIONS), 2)
                await _give(redis_client, q, giver=giver, taker=taker, transfer=f"d{step}", now=clock.now_us)
                if rng.random() < 0.5:
                    clock.advance(TRANSFER_TIMEOUT_S + 1)
                    level = max(0.0, level - (TRANSFER_TIMEOUT_S + 1) * limit / period_s)
                    await core.recover_escrow()
            slices, in_flight = await capacity(redis_client, q)
            assert slices + in_flight == limit, step

"""Client CPU per call of the Redis clients quotad could use for a Redis Cluster, with its real reserve script.

    python bench/cluster_clients.py                    # 20,000 calls per client, 64 in flight
    python bench/cluster_clients.py --reshard 1000     # and move 1,000 slots between shards meanwhile
    python bench/cluster_clients.py --wait             # a replica per shard, and glide + WAIT 1 per call

Each client runs the same EVALSHAs of quotad's reserve.lua (built by RedisStore.reserve_command:
four limits, 2,000 tenants so the calls spread over the slots) with 64 calls in flight, and the
table reports this process's CPU (user + system, every thread: glide's core runs in threads of its
own) per call, calls per second and the calls that failed. quotad's own RespClient runs against
one server (it does not follow a cluster); the others against a 3-shard cluster on loopback.
With --reshard, slots move from the first shard to the second while each cluster client runs
(CLUSTER SETSLOT IMPORTING/MIGRATING + MIGRATE, as `valkey-cli --cluster reshard` does) and
back again before the next, so every client sees the same migration.

With --wait every shard has a replica, and one more row sends `WAIT 1 100` to the slot's primary
after each script: what it would cost quotad to acknowledge a reservation only once a replica has
it (docs/operations.md, failover).

The result chose the client of store/cluster.py (see its docstring).
"""

from __future__ import annotations

import argparse
import asyncio
import random
import textwrap
import threading
import time
from collections.abc import Awaitable, Callable
from typing import Any

import redis.asyncio.cluster as redis_cluster
from glide import (
    GlideClusterClient,
    GlideClusterClientConfiguration,
    NodeAddress,
    Script,
    SlotKeyRoute,
    SlotType,
)
from quotad_server.core import QuotaCore, ReserveRequest
from quotad_server.policy import parse_policy
from quotad_server.store.embedded import SLOTS, EmbeddedCluster, EmbeddedRedis, command, info_fields
from quotad_server.store.redis import RedisStore, _load_script
from quotad_server.store.resp import RedisAddress, RespClient
from quotad_server.store.resp import Script as RespScript

POLICY = textwrap.dedent("""
    defaults: {tier: standard}
    models: {gpt-4o: {}}
    tiers:
      standard:
        limits:
          - {name: rpm, metric: requests, limit: 600, period: 1m, algorithm: sliding_window}
          - {name: rph, metric: requests, limit: 10000, period: 1h, algorithm: sliding_window}
          - {name: tpm, metric: total_tokens, limit: 100000, period: 1m}
    tenants:
      "*": {limits: [{name: tenant-tpm, metric: total_tokens, limit: 100000000, period: 1m}]}
""")

Call = tuple[list[str], list[str]]
Runner = Callable[[], Awaitable[dict[str, float]]]


def calls(count: int) -> list[Call]:
    """The KEYS and ARGV of `count` reserve scripts, each with its own reservation id."""
    store = RedisStore.from_url("redis://127.0.0.1:1", timeout_s=1)  # builds commands; never connects
    core = QuotaCore(parse_policy(POLICY, "cluster_clients.yaml"), store)
    rng = random.Random(15)
    built = []
    for _ in range(count):
        request = ReserveRequest(
            subject=f"user-{rng.randrange(100_000)}",
            tenant=f"tenant-{rng.randrange(2_000)}",
            model="gpt-4o",
            input_tokens=rng.randint(100, 2000),
            max_output_tokens=256,
        )
        _, _, keys, argv = store.reserve_command(core.plan_for(request, request.input_tokens))
        built.append((keys, [str(arg) for arg in argv]))
    return built


async def drive(run: Callable[[Call], Awaitable[Any]], work: list[Call], inflight: int) -> dict[str, float]:
    queue = iter(work)
    errors: dict[str, int] = {}

    async def worker() -> None:
        for call in queue:
            try:
                await run(call)
            except Exception as error:  # counted, by kind: the point of the run
                kind = str(error).split(":")[0][:60]
                errors[kind] = errors.get(kind, 0) + 1

    cpu, wall = time.process_time(), time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(inflight)))
    cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
    failed = sum(errors.values())
    if errors:
        print("   errors:", errors)
    return {"cpu_us": cpu / len(work) * 1e6, "per_s": len(work) / wall, "errors": failed}


def redis_cpu(nodes: list[EmbeddedRedis]) -> list[float]:
    """Each server's CPU seconds so far (user + system, its main thread and its I/O threads)."""
    seconds = []
    for node in nodes:
        fields = info_fields(command(node.port, "INFO", "cpu"))
        seconds.append(float(fields["used_cpu_user"]) + float(fields["used_cpu_sys"]))
    return seconds


async def measured(run: Runner, nodes: list[EmbeddedRedis], count: int) -> dict[str, Any]:
    """`run`'s figures, with the Redis CPU per call of each of `nodes` (the shards' primaries)."""
    before = redis_cpu(nodes)
    row: dict[str, Any] = dict(await run())
    per_shard = [(b - a) / count * 1e6 for a, b in zip(before, redis_cpu(nodes), strict=True)]
    row["redis_us"], row["shards_us"] = sum(per_shard), per_shard
    return row


def mover(cluster: EmbeddedCluster, slots: int, stop: threading.Event, moved: list[int]) -> threading.Thread:
    """Move `slots` slots from shard 0 to shard 1, one at a time, until done or stopped."""

    def move() -> None:
        source, target = cluster.nodes[0], cluster.nodes[1]
        for slot in range(slots):
            if stop.is_set():
                return
            cluster.move_slots([slot], source, target)
            moved.append(slot)

    thread = threading.Thread(target=move, daemon=True)
    thread.start()
    return thread


def runners(cluster: EmbeddedCluster, source: str, work: list[Call], wait: bool) -> list[tuple[str, Runner]]:
    """The cluster clients to measure, each as a coroutine function that runs `work` and reports."""
    seeds = [NodeAddress("127.0.0.1", node.port) for node in cluster.nodes]

    async def glide_raw() -> dict[str, float]:
        glide = await GlideClusterClient.create(GlideClusterClientConfiguration(seeds, request_timeout=5000))
        reserve = Script(source)  # type: ignore[no-untyped-call]
        try:
            return await drive(lambda c: glide.invoke_script(reserve, keys=c[0], args=c[1]), work, 64)
        finally:
            await glide.close()

    async def glide_wait() -> dict[str, float]:
        glide = await GlideClusterClient.create(GlideClusterClientConfiguration(seeds, request_timeout=5000))
        reserve = Script(source)  # type: ignore[no-untyped-call]

        async def call(c: Call) -> None:
            await glide.invoke_script(reserve, keys=c[0], args=c[1])
            acked = await glide.custom_command(["WAIT", "1", "100"], SlotKeyRoute(SlotType.PRIMARY, c[0][0]))
            if acked != 1:
                raise RuntimeError("WAIT: no replica acknowledged within 100 ms")

        try:
            return await drive(call, work, 64)
        finally:
            await glide.close()

    async def glide_store() -> dict[str, float]:
        store = RedisStore.cluster(cluster.seeds, timeout_s=5)
        connection = store._client  # what RedisStore calls, deadlines and late replies included
        reserve = RespScript(source)
        connection.register(reserve)
        await connection.sync_clock()
        try:
            return await drive(lambda c: connection.run_script(reserve, *c), work, 64)
        finally:
            await store.aclose()

    async def redis_py() -> dict[str, float]:
        rc = redis_cluster.RedisCluster(host="127.0.0.1", port=cluster.nodes[0].port)
        await rc.initialize()
        sha = await rc.script_load(source)
        try:
            return await drive(lambda c: rc.evalsha(sha, len(c[0]), *c[0], *c[1]), work, 64)
        finally:
            await rc.aclose()

    runs: list[tuple[str, Runner]] = [
        ("valkey-glide GlideClusterClient", glide_raw),
        ("quotad GlideCluster (glide + deadlines)", glide_store),
        ("redis-py RedisCluster (asyncio)", redis_py),
    ]
    if wait:
        runs.insert(1, ("glide + WAIT 1 100 after each script", glide_wait))
    return runs


async def measure(args: argparse.Namespace) -> None:
    work = calls(args.calls)
    source = _load_script("reserve.lua")
    rows: list[tuple[str, dict[str, Any]]] = []
    with EmbeddedRedis() as single:
        client = RespClient(RedisAddress.from_url(single.url), timeout_s=5)
        script = RespScript(source)
        client.register(script)
        await client.sync_clock()

        async def own() -> dict[str, float]:
            return await drive(lambda c: client.run_script(script, *c), work, 64)

        rows.append(("quotad RespClient (one node)", await measured(own, [single], len(work))))
        await client.aclose()
    with EmbeddedCluster(3, 1 if args.wait else 0) as cluster:
        for label, run in runners(cluster, source, work, args.wait):
            stop, moved = threading.Event(), list[int]()
            thread = mover(cluster, args.reshard, stop, moved) if args.reshard else None
            rows.append((label, await measured(run, cluster.nodes[:3], len(work))))
            stop.set()
            if thread is not None:
                thread.join()
                rows[-1][1]["moved"] = len(moved)
                cluster.move_slots(moved, cluster.nodes[1], cluster.nodes[0])  # back, for the next client
    shards = ("3 shards, a replica each" if args.wait else "3 shards") + (
        f", {args.reshard} of {SLOTS} slots moving" if args.reshard else ""
    )
    print(f"reserve.lua, {args.calls:,} calls per client, 64 in flight, {shards}")
    print(
        f"{'client':42} {'CPU µs/call':>12} {'calls/s':>9} {'errors':>7} {'slots moved':>12}"
        f" {'Redis µs/call':>14}  per shard"
    )
    for label, row in rows:
        shown = f"{row['moved']:12.0f}" if "moved" in row else " " * 12
        shards = " / ".join(f"{us:.0f}" for us in row["shards_us"])
        print(
            f"{label:42} {row['cpu_us']:12.1f} {row['per_s']:9,.0f} {row['errors']:7.0f} {shown}"
            f" {row['redis_us']:14.1f}  {shards}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--calls", type=int, default=20_000)
    parser.add_argument(
        "--reshard", type=int, default=0, help="slots to move during each cluster client's run"
    )
    parser.add_argument("--wait", action="store_true", help="replicas, and a row with WAIT 1 after each call")
    asyncio.run(measure(parser.parse_args()))


if __name__ == "__main__":
    main()

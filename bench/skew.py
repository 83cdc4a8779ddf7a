"""Skew: a global limit's utilisation when all traffic hits one partition, with escrow and without.

    python bench/skew.py [--seconds 12] [--in-flight 32] [--partitions 16] [--out bench/results/skew.json]
    python bench/skew.py --shards 3 --tenants 64    # a 3-shard Redis Cluster, traffic over 64 tenants

One global token bucket (60,000 tokens per 10 s: a 60,000-token burst, then 6,000 tokens/s)
and a per-subject limit. `--in-flight` callers send CheckAndReserve for 500 tokens each
without pause, all from one tenant (so with escrow all land on one partition, one slice);
halfway through, the traffic moves to a tenant of another partition, so the capacity must
follow it. Two runs on one Valkey (flushed between them):

  one-partition  the policy without escrow: every decision in the "global" partition (one slot)
  escrow         `escrow: {partitions: N}`: the limit split into N slices, rebalanced by demand

Each run reports, every half second, the share of the limit admitted so far (tokens admitted
/ (burst + rate x elapsed): 100% is everything a single exact bucket could have admitted), the
share of the refill admitted in that half second, decisions/s, and Redis CPU (INFO cpu, user
+ system) per decision, transfers included. Over-admission is checked against the same bound
(admitted <= burst + rate x elapsed on Redis's clock). quotad's core and store run in this
process (no gRPC): the figures are about Redis and the escrow, not the servicer.

With --shards N (N > 1) the same runs go to a Redis Cluster of N primaries through quotad's
cluster client (valkey-glide), and each run also reports every shard's Redis CPU per decision:
without escrow every decision lands on the one shard of the "global" partition; with escrow,
given traffic over many tenants (--tenants K: each caller picks one of K tenants per request,
instead of the one hot tenant), the partitions and so the work spread over the shards. The move
halfway goes to K other tenants.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import textwrap
from contextlib import ExitStack
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import redis
from quotad_server.core import QuotaCore, ReserveRequest
from quotad_server.model import Decision
from quotad_server.policy import parse_policy
from quotad_server.store.embedded import EmbeddedCluster, EmbeddedRedis
from quotad_server.store.redis import RedisStore

ROOT = Path(__file__).resolve().parent.parent
LIMIT, PERIOD_S, COST = 60_000, 10, 500
POLICY = """
    defaults: {{tier: t}}
    tiers: {{t: {{limits: [{{name: subject-rpm, metric: requests, limit: 100000, period: 1m}}]}}}}
    global:
      limits:
        - {{name: provider-tpm, metric: total_tokens, limit: {limit}, period: {period}s}}
"""
SAMPLE_S = 0.5


@dataclass
class _Traffic:
    tenants: list[str]  # the tenants the callers send for now, in turn
    admitted: int = 0  # tokens
    decisions: int = 0


def cpu_s(client: redis.Redis) -> float:
    info: dict[str, Any] = client.info("cpu")
    return float(info["used_cpu_user"]) + float(info["used_cpu_sys"])


def shard_cpu_s(clients: list[redis.Redis]) -> list[float]:
    """Each shard's (primary's) Redis CPU seconds so far."""
    return [cpu_s(client) for client in clients]


def scripts_run(clients: list[redis.Redis]) -> int:
    total = 0
    for client in clients:
        stats: dict[str, Any] = client.info("commandstats")
        total += sum(int(stats.get(f"cmdstat_{name}", {}).get("calls", 0)) for name in ("evalsha", "eval"))
    return total


def redis_now_s(client: redis.Redis) -> float:
    seconds, micros = client.time()
    return int(seconds) + int(micros) / 1e6


def tenant_in_other_partition(core: QuotaCore, tenant: str) -> str:
    """Another tenant, of another partition if there is one (without escrow there is one only)."""
    others = (f"tenant-{i}" for i in range(1000))
    return next((t for t in others if core.policy.partition(t) != core.policy.partition(tenant)), "tenant-0")


def traffic(core: QuotaCore, tenants: int) -> tuple[list[str], list[str]]:
    """The tenants before the move and after it: the hot one and one of another partition, or
    `tenants` of them each time, the second set disjoint from the first."""
    if tenants == 1:
        return ["hot"], [tenant_in_other_partition(core, "hot")]
    return [f"tenant-{i}" for i in range(tenants)], [f"moved-{i}" for i in range(tenants)]


@dataclass
class Backend:
    """Where a run's Redis is: the store's URL (seeds, for a cluster) and each shard's primary."""

    url: str
    shards: list[str]

    def store(self) -> RedisStore:
        if len(self.shards) > 1:
            return RedisStore.cluster(self.url, timeout_s=5.0)
        return RedisStore.from_url(self.url, timeout_s=5.0)


async def one_run(
    backend: Backend,
    policy_yaml: str,
    seconds: float,
    in_flight: int,
    *,
    tenants: int = 1,
    limit: int = LIMIT,
) -> dict[str, Any]:
    policy = parse_policy(textwrap.dedent(policy_yaml), "skew-policy.yaml")
    store = backend.store()
    await store.start()
    core = QuotaCore(policy, store)
    maintenance = asyncio.get_running_loop().create_task(core.maintain_escrow())
    clients = [redis.Redis.from_url(url) for url in backend.shards]
    client = clients[0]
    before, after = traffic(core, tenants)
    state = _Traffic(before)
    stop = asyncio.Event()

    async def caller(index: int) -> None:
        at = 0
        while not stop.is_set():
            at += 1
            tenant = state.tenants[(index + at) % len(state.tenants)]
            request = ReserveRequest(subject=f"s{index}-{at % 100}", tenant=tenant, input_tokens=COST)
            outcome = await core.check_and_reserve(request)
            state.decisions += 1
            if outcome.decision is Decision.ALLOWED:
                state.admitted += COST

    started_shards = shard_cpu_s(clients)
    started_cpu, started, started_scripts = sum(started_shards), redis_now_s(client), scripts_run(clients)
    callers = [asyncio.create_task(caller(i)) for i in range(in_flight)]
    samples: list[dict[str, float]] = []
    last_admitted = last_decisions = 0
    last_cpu = started_cpu
    over = 0.0
    while True:
        await asyncio.sleep(SAMPLE_S)
        now = redis_now_s(client)
        elapsed = now - started
        if elapsed >= seconds / 2 and state.tenants is before:
            state.tenants = after  # the traffic moves to another partition (other tenants)
        admitted, decisions, cpu = state.admitted, state.decisions, sum(shard_cpu_s(clients))
        bound = limit + limit / PERIOD_S * elapsed
        over = max(over, admitted - bound)
        samples.append(
            {
                "t_s": round(elapsed, 2),
                "utilisation_so_far": round(admitted / bound, 4),
                "refill_admitted": round((admitted - last_admitted) / (limit / PERIOD_S * SAMPLE_S), 3),
                "decisions_per_s": round((decisions - last_decisions) / SAMPLE_S),
                "redis_cpu_us_per_decision": round(
                    (cpu - last_cpu) * 1e6 / max(1, decisions - last_decisions), 1
                ),
            }
        )
        last_admitted, last_decisions, last_cpu = admitted, decisions, cpu
        if elapsed >= seconds:
            break
    stop.set()
    await asyncio.gather(*callers)
    maintenance.cancel()
    elapsed = redis_now_s(client) - started
    shards_cpu = [end - start for start, end in zip(started_shards, shard_cpu_s(clients), strict=True)]
    total_cpu = sum(shards_cpu)
    scripts = scripts_run(clients) - started_scripts
    await store.aclose()
    for each in clients:
        each.close()
    decisions = state.decisions
    return {
        "samples": samples,
        "seconds": round(elapsed, 2),
        "decisions": decisions,
        "decisions_per_s": round(decisions / elapsed),
        "admitted_tokens": state.admitted,
        "utilisation": round(state.admitted / (limit + limit / PERIOD_S * elapsed), 4),
        "max_over_admission_tokens": max(0.0, round(over)),
        "redis_cpu_us_per_decision": round(total_cpu * 1e6 / max(1, decisions), 1),
        "shard_redis_cpu_us_per_decision": [round(cpu * 1e6 / max(1, decisions), 1) for cpu in shards_cpu],
        "scripts_per_decision": round(scripts / max(1, decisions), 3),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seconds", type=float, default=12.0)
    parser.add_argument("--in-flight", type=int, default=32)
    parser.add_argument("--partitions", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=1, help="each mode this many times, interleaved")
    parser.add_argument(
        "--limit", type=int, default=LIMIT, help="the global limit, tokens per 10 s (large: it never binds)"
    )
    parser.add_argument("--shards", type=int, default=1, help="a Redis Cluster of this many primaries if > 1")
    parser.add_argument(
        "--tenants", type=int, default=1, help="tenants the traffic spreads over (1: all on one, the skew)"
    )
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "skew.json")
    args = parser.parse_args()
    base = POLICY.format(limit=args.limit, period=PERIOD_S)
    modes = {
        "one-partition": base,
        "escrow": base + f"    escrow: {{partitions: {args.partitions}}}\n",
    }
    results: dict[str, Any] = {}
    rounds: list[dict[str, Any]] = []
    with ExitStack() as running:
        if args.shards > 1:
            cluster = running.enter_context(EmbeddedCluster(args.shards))
            primaries = [node.url for node in cluster.nodes[: args.shards]]
            backend = Backend(cluster.seeds, primaries)
        else:
            valkey = running.enter_context(EmbeddedRedis())
            backend = Backend(valkey.url, [valkey.url])
        for _ in range(args.rounds):
            for name, policy in modes.items():
                for url in backend.shards:
                    redis.Redis.from_url(url).flushall()
                results[name] = asyncio.run(
                    one_run(
                        backend, policy, args.seconds, args.in_flight, tenants=args.tenants, limit=args.limit
                    )
                )
            rounds.append(dict(results))
    where = f"a {args.shards}-shard Redis Cluster" if args.shards > 1 else "one Redis"
    spread = "one tenant" if args.tenants == 1 else f"{args.tenants} tenants"
    print(
        f"global limit {args.limit:,} tokens per {PERIOD_S} s, {COST} tokens a request, {args.in_flight} in flight,"
        f" on {where}, all traffic on {spread}, moved to another partition at {args.seconds / 2:g} s:"
    )
    print(f"{'t (s)':>6} " + " ".join(f"{name + ' so far':>24} {'refill':>7}" for name in modes))
    for rows in zip(*(results[name]["samples"] for name in modes), strict=False):
        print(
            f"{rows[0]['t_s']:>6.1f} "
            + " ".join(f"{row['utilisation_so_far']:>24.1%} {row['refill_admitted']:>7.0%}" for row in rows)
        )
    print(
        f"\n{'':<16}{'utilisation':>12}{'over-admitted':>15}{'decisions/s':>13}{'Redis CPU/decision':>20}"
        f"{'scripts/decision':>18}" + ("  per shard, µs/decision" if args.shards > 1 else "")
    )
    for at, done in enumerate(rounds):
        for name in modes:
            r = done[name]
            shards = " / ".join(f"{us:.1f}" for us in r["shard_redis_cpu_us_per_decision"])
            print(
                f"{name + (f' #{at + 1}' if len(rounds) > 1 else ''):<16}{r['utilisation']:>12.1%}"
                f"{r['max_over_admission_tokens']:>15,}{r['decisions_per_s']:>13,}"
                f"{r['redis_cpu_us_per_decision']:>17.1f} µs{r['scripts_per_decision']:>18.3f}"
                + (f"  {shards}" if args.shards > 1 else "")
            )
    args.out.write_text(
        json.dumps(
            {
                "when": datetime.now(UTC).isoformat(timespec="seconds"),
                "machine": platform.platform(),
                "load_average_at_end": [round(x, 2) for x in os.getloadavg()],  # a shared machine: noise
                "limit_tokens": args.limit,
                "period_s": PERIOD_S,
                "cost_tokens": COST,
                "in_flight": args.in_flight,
                "partitions": args.partitions,
                "shards": args.shards,
                "tenants": args.tenants,
                "rounds": rounds,
            },
            indent=1,
        )
        + "\n"
    )


if __name__ == "__main__":
    main()

"""Skew: a global limit's utilisation when all traffic hits one partition, with escrow and without.

    python bench/skew.py [--seconds 12] [--in-flight 32] [--partitions 16] [--out bench/results/skew.json]

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
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import textwrap
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import redis
from quotad_server.core import QuotaCore, ReserveRequest
from quotad_server.model import Decision
from quotad_server.policy import parse_policy
from quotad_server.store.embedded import EmbeddedRedis
from quotad_server.store.redis import RedisStore

ROOT = Path(__file__).resolve().parent.parent
LIMIT, PERIOD_S, COST = 60_000, 10, 500
POLICY = f"""
    defaults: {{tier: t}}
    tiers: {{t: {{limits: [{{name: subject-rpm, metric: requests, limit: 100000, period: 1m}}]}}}}
    global:
      limits:
        - {{name: provider-tpm, metric: total_tokens, limit: {LIMIT}, period: {PERIOD_S}s}}
"""
SAMPLE_S = 0.5


@dataclass
class _Traffic:
    tenant: str  # the tenant every caller sends for now
    admitted: int = 0  # tokens
    decisions: int = 0


def cpu_s(client: redis.Redis) -> float:
    info: dict[str, Any] = client.info("cpu")
    return float(info["used_cpu_user"]) + float(info["used_cpu_sys"])


def scripts_run(client: redis.Redis) -> int:
    stats: dict[str, Any] = client.info("commandstats")
    return sum(int(stats.get(f"cmdstat_{name}", {}).get("calls", 0)) for name in ("evalsha", "eval"))


def redis_now_s(client: redis.Redis) -> float:
    seconds, micros = client.time()
    return int(seconds) + int(micros) / 1e6


def tenant_in_other_partition(core: QuotaCore, tenant: str) -> str:
    """Another tenant, of another partition if there is one (without escrow there is one only)."""
    others = (f"tenant-{i}" for i in range(1000))
    return next((t for t in others if core.policy.partition(t) != core.policy.partition(tenant)), "tenant-0")


async def one_run(url: str, policy_yaml: str, seconds: float, in_flight: int) -> dict[str, Any]:
    policy = parse_policy(textwrap.dedent(policy_yaml), "skew-policy.yaml")
    store = RedisStore.from_url(url, timeout_s=5.0)
    await store.start()
    core = QuotaCore(policy, store)
    maintenance = asyncio.get_running_loop().create_task(core.maintain_escrow())
    client = redis.Redis.from_url(url)
    tenants = ["hot", tenant_in_other_partition(core, "hot")]
    state = _Traffic(tenants[0])
    stop = asyncio.Event()

    async def caller(index: int) -> None:
        at = 0
        while not stop.is_set():
            at += 1
            request = ReserveRequest(subject=f"s{index}-{at % 100}", tenant=state.tenant, input_tokens=COST)
            outcome = await core.check_and_reserve(request)
            state.decisions += 1
            if outcome.decision is Decision.ALLOWED:
                state.admitted += COST

    started_cpu, started, started_scripts = cpu_s(client), redis_now_s(client), scripts_run(client)
    callers = [asyncio.create_task(caller(i)) for i in range(in_flight)]
    samples: list[dict[str, float]] = []
    last_admitted = last_decisions = 0
    last_cpu = started_cpu
    over = 0.0
    while True:
        await asyncio.sleep(SAMPLE_S)
        now = redis_now_s(client)
        elapsed = now - started
        if elapsed >= seconds / 2 and state.tenant == tenants[0]:
            state.tenant = tenants[1]  # the traffic moves to another partition
        admitted, decisions, cpu = state.admitted, state.decisions, cpu_s(client)
        bound = LIMIT + LIMIT / PERIOD_S * elapsed
        over = max(over, admitted - bound)
        samples.append(
            {
                "t_s": round(elapsed, 2),
                "utilisation_so_far": round(admitted / bound, 4),
                "refill_admitted": round((admitted - last_admitted) / (LIMIT / PERIOD_S * SAMPLE_S), 3),
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
    total_cpu = cpu_s(client) - started_cpu
    scripts = scripts_run(client) - started_scripts
    await store.aclose()
    client.close()
    decisions = state.decisions
    return {
        "samples": samples,
        "seconds": round(elapsed, 2),
        "decisions": decisions,
        "decisions_per_s": round(decisions / elapsed),
        "admitted_tokens": state.admitted,
        "utilisation": round(state.admitted / (LIMIT + LIMIT / PERIOD_S * elapsed), 4),
        "max_over_admission_tokens": max(0.0, round(over)),
        "redis_cpu_us_per_decision": round(total_cpu * 1e6 / max(1, decisions), 1),
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
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "skew.json")
    args = parser.parse_args()
    modes = {
        "one-partition": POLICY,
        "escrow": POLICY + f"    escrow: {{partitions: {args.partitions}}}\n",
    }
    results: dict[str, Any] = {}
    rounds: list[dict[str, Any]] = []
    with EmbeddedRedis() as valkey:
        for _ in range(args.rounds):
            for name, policy in modes.items():
                redis.Redis.from_url(valkey.url).flushall()
                results[name] = asyncio.run(one_run(valkey.url, policy, args.seconds, args.in_flight))
            rounds.append(dict(results))
    print(
        f"global limit {LIMIT:,} tokens per {PERIOD_S} s, {COST} tokens a request, {args.in_flight} in flight,"
        f" all traffic on one tenant, moved to another partition at {args.seconds / 2:g} s:"
    )
    print(f"{'t (s)':>6} " + " ".join(f"{name + ' so far':>24} {'refill':>7}" for name in modes))
    for rows in zip(*(results[name]["samples"] for name in modes), strict=False):
        print(
            f"{rows[0]['t_s']:>6.1f} "
            + " ".join(f"{row['utilisation_so_far']:>24.1%} {row['refill_admitted']:>7.0%}" for row in rows)
        )
    print(
        f"\n{'':<16}{'utilisation':>12}{'over-admitted':>15}{'decisions/s':>13}{'Redis CPU/decision':>20}"
        f"{'scripts/decision':>18}"
    )
    for at, done in enumerate(rounds):
        for name in modes:
            r = done[name]
            print(
                f"{name + (f' #{at + 1}' if len(rounds) > 1 else ''):<16}{r['utilisation']:>12.1%}"
                f"{r['max_over_admission_tokens']:>15,}{r['decisions_per_s']:>13,}"
                f"{r['redis_cpu_us_per_decision']:>17.1f} µs{r['scripts_per_decision']:>18.3f}"
            )
    args.out.write_text(
        json.dumps(
            {
                "when": datetime.now(UTC).isoformat(timespec="seconds"),
                "machine": platform.platform(),
                "load_average_at_end": [round(x, 2) for x in os.getloadavg()],  # a shared machine: noise
                "limit_tokens": LIMIT,
                "period_s": PERIOD_S,
                "cost_tokens": COST,
                "in_flight": args.in_flight,
                "partitions": args.partitions,
                "rounds": rounds,
            },
            indent=1,
        )
        + "\n"
    )


if __name__ == "__main__":
    main()

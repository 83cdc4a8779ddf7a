"""Redis memory per reservation and per subject: what sizing a Redis for quotad needs.

    python bench/memory.py [--reservations 50000] [--out bench/results/memory.json]

A real quotad core on a real Valkey, with the benchmark's four limits (600 requests/min and
10,000/hour as request windows sharing one zset, a token bucket per subject and a global
one; the buckets per day here, so that none drains and expires during the run). Memory is
Redis's own `used_memory`, measured around these steps:

1. one reservation each for N new subjects: a subject's counters plus an open reservation;
2. N more reservations for those same subjects: an open reservation alone (its record,
   and its member in the subject's request window);
3. Commit of the reservations of step 2: the record shrinks to what answers retries;
4. the removal of step 2's window members, as the longest window would drop them.

A record lives for its lease plus the policy's `retention` (default 24 h) whether it is
settled or not, so at a steady rate R a Redis holds about R x retention settled records:
the figures below times that are what to provision.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import platform
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import redis
from quotad_server.core import QuotaCore, ReserveRequest
from quotad_server.policy import parse_policy
from quotad_server.store.embedded import EmbeddedRedis
from quotad_server.store.redis import RedisStore

ROOT = Path(__file__).resolve().parent.parent
POLICY = """
version: 1
defaults: {tier: standard}
leases: {default: 30s, min: 1s, max: 5m}
models: {gpt-4o: {}}
tiers:
  standard:
    limits:
      - {name: rpm, metric: requests, limit: 600, period: 1m, algorithm: sliding_window}
      - {name: rph, metric: requests, limit: 10000, period: 1h, algorithm: sliding_window}
      - {name: tpd, metric: total_tokens, limit: 100000, period: 24h}
global:
  limits:
    - {name: global-tpd, metric: total_tokens, limit: 1000000000, period: 24h}
"""
CONCURRENCY = 256  # decisions in flight: pipelined, so the run takes seconds


@dataclass(frozen=True)
class Figures:
    reservations: int
    per_subject: float  # bytes: a subject's counters, with the first reservation's member
    per_open_reservation: float  # bytes: its record and its member in the request window
    per_settled_reservation: float  # bytes: the settled record and the member
    per_window_member: float  # bytes: the member, which leaves with the longest window (1 h)
    server: str  # the Redis or Valkey version measured

    @property
    def per_settled_record(self) -> float:
        """What stays for `retention` after the lease: the settled record alone."""
        return self.per_settled_reservation - self.per_window_member


def _server_version(info: dict[str, str]) -> str:
    if "valkey_version" in info:
        return f"valkey {info['valkey_version']}"
    return f"redis {info['redis_version']}"


async def _reserve_all(core: QuotaCore, subjects: list[str]) -> list[str]:
    ids: list[str] = []
    for start in range(0, len(subjects), CONCURRENCY):
        outcomes = await asyncio.gather(
            *(
                core.check_and_reserve(
                    ReserveRequest(subject=subject, model="gpt-4o", input_tokens=800, max_output_tokens=256)
                )
                for subject in subjects[start : start + CONCURRENCY]
            )
        )
        for outcome in outcomes:
            if not outcome.reservation_id:
                raise RuntimeError(f"a reservation was denied: {outcome}")
            ids.append(outcome.reservation_id)
    return ids


async def _commit_all(core: QuotaCore, ids: list[str]) -> None:
    for start in range(0, len(ids), CONCURRENCY):
        await asyncio.gather(*(core.commit(rid, 700, 120) for rid in ids[start : start + CONCURRENCY]))


async def measure(url: str, reservations: int) -> Figures:
    client = redis.Redis.from_url(url)
    store = RedisStore.from_url(url, timeout_s=5.0)
    await store.start()
    core = QuotaCore(parse_policy(POLICY, "bench/memory.py"), store)

    def used() -> int:
        return int(client.info("memory")["used_memory"])

    try:
        client.flushall()
        await _reserve_all(core, ["warm-up"])  # the global bucket exists from here on
        subjects = [f"user-{i}" for i in range(reservations)]
        before = used()
        await _reserve_all(core, subjects)  # 1: new subjects
        first = used() - before
        before = used()
        ids = await _reserve_all(core, subjects)  # 2: the same subjects again
        open_ = used() - before
        before = used()
        await _commit_all(core, ids)  # 3: settled
        settled = open_ + used() - before
        # 4: the newest member of each request window (step 2's) leaves, as it would after 1 h.
        before = used()
        pipe = client.pipeline(transaction=False)
        for key in client.scan_iter(match="*:l:s:*:wr", count=1000):
            pipe.zpopmax(key, 1)
        pipe.execute()
        member = before - used()
        version = _server_version(client.info("server"))
    finally:
        await store.aclose()
        client.close()
    return Figures(
        reservations=reservations,
        per_subject=(first - open_) / reservations,
        per_open_reservation=open_ / reservations,
        per_settled_reservation=settled / reservations,
        per_window_member=member / reservations,
        server=version,
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--reservations", type=int, default=50_000)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "memory.json")
    args = parser.parse_args()
    with EmbeddedRedis() as valkey:
        figures = asyncio.run(measure(valkey.url, args.reservations))
    print(
        f"{figures.server}, {figures.reservations:,} reservations,"
        " 4 limits (2 request windows, 2 token buckets):"
    )
    print(f"  a subject's counters          {figures.per_subject:7.0f} bytes")
    print(f"  an open reservation           {figures.per_open_reservation:7.0f} bytes")
    print(f"  a settled reservation         {figures.per_settled_reservation:7.0f} bytes")
    print(f"  of which its window member    {figures.per_window_member:7.0f} bytes (gone after 1 h)")
    print(f"  a settled record              {figures.per_settled_record:7.0f} bytes (kept for `retention`)")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(
        json.dumps(
            {
                "date": datetime.now(UTC).isoformat(timespec="seconds"),
                "python": platform.python_version(),
                **dataclasses.asdict(figures),
                "per_settled_record": figures.per_settled_record,
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()

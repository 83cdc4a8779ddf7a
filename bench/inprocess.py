"""quotad's own CPU per decision, in process: the servicer, core and store on a real Valkey.

    python bench/inprocess.py [--decisions 100000] [--in-flight 64] [--metrics] [--runs 3]

No gRPC and no load generator: scenario 1's CheckAndReserve requests (4 limits,
100,000 subjects) go straight to QuotaServicer.CheckAndReserve, `--in-flight` at a time,
and each response is serialized as gRPC would. The figure is this process's CPU time
(user + system) per decision: what quotad's Python, its Redis client and asyncio cost,
without the gRPC machinery that bench/run.py's no-op server measures. Log lines go to a
pipe drained by another process, as in a container; set PYTHONUNBUFFERED=1 to match the
image. Redis runs in its own process and is not counted.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import redis
from quotad.v1 import quota_pb2 as pb
from quotad_server.api import QuotaServicer
from quotad_server.core import QuotaCore
from quotad_server.logs import configure_logging
from quotad_server.metrics import InstrumentedCore, InstrumentedStore, Metrics
from quotad_server.policy import load_policy
from quotad_server.store.embedded import EmbeddedRedis
from quotad_server.store.redis import RedisStore

ROOT = Path(__file__).resolve().parent.parent
POLICY = ROOT / "bench" / "policy.yaml"
SUBJECTS = 100_000


def _flush(url: str) -> None:
    client = redis.Redis.from_url(url)
    client.flushall()
    client.close()


class _Context:
    """The servicer context of a plaintext call with no deadline and no identity, as the servicer
    reads it (errors would abort: none are expected)."""

    def time_remaining(self) -> None:
        return None

    def invocation_metadata(self) -> tuple[()]:
        return ()

    def auth_context(self) -> dict[str, list[bytes]]:
        return {}


async def one_run(url: str, requests: list[bytes], in_flight: int, metrics: bool) -> tuple[float, float]:
    """(CPU µs, wall µs) per decision."""
    store = RedisStore.from_url(url, timeout_s=5.0)
    await store.start()
    policy = load_policy(POLICY)
    if metrics:
        registry = Metrics()
        servicer = QuotaServicer(
            InstrumentedCore(policy, InstrumentedStore(store, registry), metrics=registry), registry
        )
    else:
        servicer = QuotaServicer(QuotaCore(policy, store))
    context: Any = _Context()  # CheckAndReserve reads the caller's deadline, and aborts on errors

    async def caller(first: int) -> None:
        for raw in requests[first::in_flight]:
            response = await servicer.CheckAndReserve(pb.CheckAndReserveRequest.FromString(raw), context)
            if response.decision != pb.DECISION_ALLOWED:
                raise RuntimeError(f"a decision was not allowed: {response}")
            response.SerializeToString()

    cpu, wall = time.process_time(), time.perf_counter()
    await asyncio.gather(*(caller(i) for i in range(in_flight)))
    cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
    await store.aclose()
    return cpu / len(requests) * 1e6, wall / len(requests) * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--decisions", type=int, default=100_000)
    parser.add_argument("--in-flight", type=int, default=64)
    parser.add_argument("--metrics", action="store_true", help="metrics on, as the Helm chart deploys")
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()

    rng = random.Random(1)
    requests = [
        pb.CheckAndReserveRequest(
            subject=f"user-{rng.randrange(SUBJECTS)}",
            model="gpt-4o",
            input_tokens=rng.randint(100, 2000),
            max_output_tokens=256,
        ).SerializeToString()
        for _ in range(args.decisions)
    ]
    # The log lines go to a pipe that another process drains, as a container runtime does.
    drain = subprocess.Popen(["cat"], stdin=subprocess.PIPE, stdout=subprocess.DEVNULL)
    assert drain.stdin is not None
    log_stream = os.fdopen(os.dup(drain.stdin.fileno()), "w")
    configure_logging("json", "info", log_stream)
    cpu_us, wall_us = [], []
    try:
        with EmbeddedRedis() as valkey:
            for _ in range(args.runs):
                _flush(valkey.url)
                cpu, wall = asyncio.run(one_run(valkey.url, requests, args.in_flight, args.metrics))
                cpu_us.append(cpu)
                wall_us.append(wall)
    finally:
        log_stream.close()
        drain.stdin.close()
        drain.wait()
    print(
        f"{args.decisions:,} decisions, {args.in_flight} in flight, metrics {'on' if args.metrics else 'off'},"
        f" PYTHONUNBUFFERED={os.environ.get('PYTHONUNBUFFERED', '')!r}, Python {sys.version.split()[0]}:"
    )
    print(
        f"  CPU per decision   {statistics.median(cpu_us):6.1f} us (min {min(cpu_us):.1f}, max {max(cpu_us):.1f})"
    )
    print(f"  wall per decision  {statistics.median(wall_us):6.1f} us")


if __name__ == "__main__":
    main()

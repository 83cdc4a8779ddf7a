"""A burst, replayed: steady HIGH traffic and a LOW flood three times the provider's limit.

    python bench/burst.py [--seconds 12] [--out-dir bench/results]
    python bench/burst.py --aging 1s --replicas 3     # aging: LOW outranks new HIGH after 2 s of waiting

A real quotad (`quotad serve`) on a real Valkey, driven by asyncio clients at fixed
rates. The provider limit is shared (global), with LOW allowed 60% of it and NORMAL 85%.
HIGH sends steadily the whole time; LOW floods at 3x the limit in the middle third,
asking to wait up to 2 s. Prints per priority the admitted rate during the flood, the
p50/p99 wait and the denials, and writes burst.png: admitted tokens/s per priority over
time, with the limit. HIGH must keep its admitted rate through the flood.

With a short --aging, LOW waiters that have waited twice that long outrank newly arriving HIGH
ones (HIGH's boost is two steps of aging): LOW then makes progress through the flood, and HIGH
must still have (nearly) all of its calls admitted. --replicas N sprays the calls over N quotad
processes on the one Redis, as a deployment does.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import grpc
from google.protobuf import duration_pb2
from quotad.v1 import quota_pb2 as pb
from quotad.v1 import quota_pb2_grpc as pb_grpc
from quotad_server.store.embedded import EmbeddedRedis, free_port

ROOT = Path(__file__).resolve().parent.parent
LIMIT_PER_S = 3000  # the provider's tokens per second (a 2 s bucket of 6,000)
TOKENS = 100  # per call
HIGH_PER_S = 10  # 1,000 tokens/s: a third of the limit
LOW_PER_S = 90  # 9,000 tokens/s while flooding: three times the limit
POLICY = f"""
defaults: {{tier: app}}
admission: {{low: 0.6, normal: 0.85, high: 1.0}}
waiting: {{max_wait: 5s, max_line: 2000, aging: AGING, heartbeat: 1s}}
tiers:
  app: {{limits: []}}
global:
  limits:
    - {{name: provider-tps, metric: input_tokens, limit: {LIMIT_PER_S * 2}, period: 2s}}
"""


async def drive(addresses: list[str], seconds: float) -> list[dict[str, Any]]:
    """Send both streams of calls, each call to the next replica in turn; one record per call."""
    records: list[dict[str, Any]] = []
    max_wait = duration_pb2.Duration(seconds=2)
    channels = [grpc.aio.insecure_channel(address) for address in addresses]
    try:
        stubs = [pb_grpc.QuotaServiceStub(channel) for channel in channels]
        started = time.monotonic()

        async def call(priority: pb.Priority.ValueType, index: int) -> None:
            sent = time.monotonic() - started
            request = pb.CheckAndReserveRequest(
                subject=f"u{index % 50}", priority=priority, input_tokens=TOKENS, max_wait=max_wait
            )
            response = await stubs[index % len(stubs)].CheckAndReserve(request, timeout=10)
            records.append({
                "priority": "high" if priority == pb.PRIORITY_HIGH else "low",
                "sent": sent,
                "decided": time.monotonic() - started,
                "allowed": response.decision == pb.DECISION_ALLOWED,
                "waited": response.waited.seconds + response.waited.nanos / 1e9,
            })  # fmt: skip

        async def stream(priority: pb.Priority.ValueType, rate: float, start: float, stop: float) -> None:
            tasks, index = [], 0
            while (now := time.monotonic() - started) < stop:
                if now >= start:
                    tasks.append(asyncio.ensure_future(call(priority, index)))
                    index += 1
                await asyncio.sleep(1 / rate)
            await asyncio.gather(*tasks)

        await asyncio.gather(
            stream(pb.PRIORITY_HIGH, HIGH_PER_S, 0, seconds),
            stream(pb.PRIORITY_LOW, LOW_PER_S, seconds / 3, 2 * seconds / 3),
        )
    finally:
        for channel in channels:
            await channel.close()
    return records


def summarize(records: list[dict[str, Any]], seconds: float) -> dict[str, Any]:
    flood = (seconds / 3 + 1, 2 * seconds / 3)  # skip the first second: the bucket starts full
    summary: dict[str, Any] = {}
    for priority in ("high", "low"):
        mine = [r for r in records if r["priority"] == priority]
        in_flood = [r for r in mine if r["allowed"] and flood[0] <= r["decided"] < flood[1]]
        waits = sorted(r["waited"] for r in mine if r["allowed"])
        summary[priority] = {
            "calls": len(mine),
            "denied": sum(not r["allowed"] for r in mine),
            "admitted_share": sum(r["allowed"] for r in mine) / len(mine) if mine else 0.0,
            "admitted_tokens_per_s_in_flood": len(in_flood) * TOKENS / (flood[1] - flood[0]),
            "wait_p50_s": statistics.median(waits) if waits else 0.0,
            "wait_p99_s": waits[int(0.99 * (len(waits) - 1))] if waits else 0.0,
        }
    return summary


def chart(records: list[dict[str, Any]], seconds: float, path: Path) -> None:
    import matplotlib  # noqa: PLC0415  (only the chart needs it)

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    # Admitted tokens per second, averaged over the bucket's 2 s period (as the provider counts).
    step, window = 0.25, 2.0
    xs = [i * step for i in range(int((seconds + 2) / step))]
    rates: dict[str, list[float]] = {"high": [], "low": []}
    for x in xs:
        for priority, series in rates.items():
            tokens = sum(
                TOKENS
                for r in records
                if r["allowed"] and r["priority"] == priority and x - window < r["decided"] <= x
            )
            series.append(tokens / window)
    figure, axes = plt.subplots(figsize=(8, 4))
    axes.stackplot(
        xs,
        rates["high"],
        rates["low"],
        labels=["HIGH admitted", "LOW admitted"],
        colors=["#1f77b4", "#ff7f0e"],
    )
    axes.axhline(LIMIT_PER_S, color="black", linestyle="--", label="provider limit (tokens/s)")
    axes.axvspan(seconds / 3, 2 * seconds / 3, color="grey", alpha=0.15, label="LOW flood (3x the limit)")
    axes.set_xlabel("seconds")
    axes.set_ylabel("admitted tokens per second")
    axes.set_title("quotad: a LOW flood against a shared provider limit")
    axes.legend(loc="upper right", fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=100)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seconds", type=float, default=15.0)
    parser.add_argument("--out-dir", type=Path, default=ROOT / "bench" / "results")
    parser.add_argument("--aging", default="30s", help="the policy's waiting.aging (default 30s)")
    parser.add_argument("--replicas", type=int, default=1, help="quotad processes on the one Redis")
    args = parser.parse_args()
    with EmbeddedRedis() as valkey, tempfile.TemporaryDirectory() as tmp:
        policy = Path(tmp) / "policy.yaml"
        policy.write_text(POLICY.replace("AGING", args.aging))
        addresses = [f"127.0.0.1:{free_port()}" for _ in range(args.replicas)]
        servers = [
            subprocess.Popen(
                [sys.executable, "-m", "quotad_server", "serve"],
                env={
                    **os.environ,
                    "QUOTAD_POLICY": str(policy),
                    "QUOTAD_LISTEN": address,
                    "QUOTAD_REDIS_URL": valkey.url,
                    "QUOTAD_LOG_LEVEL": "warning",
                },
            )
            for address in addresses
        ]
        try:
            for address in addresses:
                channel = grpc.insecure_channel(address)
                grpc.channel_ready_future(channel).result(timeout=30)
                channel.close()
            time.sleep(1)  # health: tokenizers loaded
            records = asyncio.run(drive(addresses, args.seconds))
        finally:
            for server in servers:
                server.terminate()
                server.wait()
    summary = summarize(records, args.seconds)
    print(
        f"limit {LIMIT_PER_S} tokens/s; HIGH offers {HIGH_PER_S * TOKENS}/s, LOW floods {LOW_PER_S * TOKENS}/s;"
        f" aging {args.aging}, {args.replicas} replica(s)"
    )
    print(
        f"{'priority':8}  {'calls':>6}  {'denied':>6}  {'admitted':>8}  {'admitted tokens/s (flood)':>25}"
        f"  {'wait p50':>8}  {'p99':>6}"
    )
    for priority, row in summary.items():
        print(f"{priority:8}  {row['calls']:>6}  {row['denied']:>6}  {row['admitted_share']:>8.0%}"
              f"  {row['admitted_tokens_per_s_in_flood']:>25.0f}"
              f"  {row['wait_p50_s']:>7.3f}s  {row['wait_p99_s']:>5.2f}s")  # fmt: skip
    args.out_dir.mkdir(parents=True, exist_ok=True)
    name = (
        "burst"
        if args.aging == "30s" and args.replicas == 1
        else f"burst-aging-{args.aging}-x{args.replicas}"
    )
    chart(records, args.seconds, args.out_dir / f"{name}.png")
    (args.out_dir / f"{name}.json").write_text(
        json.dumps(
            {"limit_tokens_per_s": LIMIT_PER_S, "aging": args.aging, "replicas": args.replicas, **summary},
            indent=2,
        )
    )
    print(f"wrote {args.out_dir / f'{name}.png'}")


if __name__ == "__main__":
    main()

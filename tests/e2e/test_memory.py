"""The chart's memory request covers what `quotad serve` really holds: measured, not guessed."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml
from quotad.v1 import quota_pb2 as pb
from quotad_server.store.embedded import EmbeddedRedis

from tests.e2e.quotad_process import Process

ROOT = Path(__file__).resolve().parents[2]
VALUES = ROOT / "helm" / "quotad" / "values.yaml"
EXAMPLE_POLICY = ROOT / "server" / "quotad_server" / "examples" / "policy.yaml"
HEADROOM = 1.25  # the request must exceed the measured footprint by at least this much
UNITS = {"Ki": 1 << 10, "Mi": 1 << 20, "Gi": 1 << 30}


def quantity(value: str) -> int:
    """Bytes in a Kubernetes memory quantity such as 256Mi."""
    number, unit = re.fullmatch(r"(\d+)(Ki|Mi|Gi)", value).groups()  # type: ignore[union-attr]
    return int(number) * UNITS[unit]


def resident_bytes(pid: int) -> int:
    status = Path(f"/proc/{pid}/status").read_text()
    kilobytes = re.search(r"^VmRSS:\s+(\d+) kB$", status, re.MULTILINE)
    assert kilobytes, status
    return int(kilobytes.group(1)) * 1024


@pytest.mark.slow
async def test_the_memory_request_covers_a_serving_quotad_with_headroom(
    tmp_path: Path, redis_server: EmbeddedRedis
) -> None:
    quotad = Process(
        tmp_path, redis_server.url, EXAMPLE_POLICY
    )  # metrics on, JSON logs: as the chart runs it
    try:
        await quotad.wait_serving()
        for index in range(200):  # warm: every code path of a decision has run
            request = pb.CheckAndReserveRequest(
                subject=f"s{index}", model="gpt-4o", prompt="hello " * 200, max_output_tokens=50
            )
            reserved = await quotad.stub.CheckAndReserve(request, timeout=10)
            if reserved.decision != pb.DECISION_ALLOWED:  # the example's shared limits may deny some
                continue
            await quotad.stub.Commit(
                pb.CommitRequest(reservation_id=reserved.reservation_id, input_tokens=200, output_tokens=20),
                timeout=10,
            )
        used = resident_bytes(quotad.process.pid)
    finally:
        await quotad.close()

    resources = yaml.safe_load(VALUES.read_text())["resources"]
    requested = quantity(resources["requests"]["memory"])
    limit = quantity(resources["limits"]["memory"])
    assert requested >= used * HEADROOM, (
        f"quotad holds {used >> 20} Mi; the chart requests {requested >> 20} Mi"
    )
    assert limit >= requested

"""The benchmark harness still works: a one-second pass prints the table and writes the JSON.

Benchmarks are not tests: this asserts only that the harness runs end to end and reports
every scenario with real, successful traffic, never on speed.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _run(script: str, *args: str, timeout_s: float) -> subprocess.CompletedProcess[str]:
    """Run a bench/ script as a user would; it must succeed."""
    result = subprocess.run(
        [sys.executable, str(ROOT / "bench" / script), *args],
        capture_output=True,
        text=True,
        timeout=timeout_s,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return result


@pytest.mark.slow
def test_bench_smoke(tmp_path: Path) -> None:
    if not (ROOT / ".tools" / "bin" / "quotad-loadgen").exists():
        pytest.fail("the load generator is not built: `make bench-tools`")
    out = tmp_path / "bench.json"
    result = _run("run.py", "--smoke", "--out", str(out), timeout_s=300)
    assert "decisions/s" in result.stdout
    assert "redis ceiling" in result.stdout
    report = json.loads(out.read_text())
    scenarios = {row["scenario"] for row in report["summary"]}
    assert scenarios == {"reserve", "reserve+commit", "hot-subject", "prompt-2kb", "batch16", "stream"}
    for row in report["summary"]:
        assert row["decisions_per_s"]["median"] > 0, row["scenario"]
        assert row["noop_decisions_per_s"]["median"] > 0, row["scenario"]
        assert row["rpc_errors"] == 0, row["scenario"]
        assert row["item_errors"] == 0, row["scenario"]
    reserve = next(row for row in report["summary"] if row["scenario"] == "reserve")
    assert reserve["floor_decisions_per_s"]["median"] > 0  # no-op + one Redis PING per call
    # no-op + quotad's own reserve script per call: every call ran the script, and cleanly
    assert reserve["script_floor_decisions_per_s"]["median"] > 0
    assert reserve["script_floor_rpc_errors"] == 0
    assert 0.95 < reserve["script_floor_scripts_per_decision"]["median"] < 1.2
    hot = next(row for row in report["summary"] if row["scenario"] == "hot-subject")
    assert hot["allowed_share"]["median"] < 0.5  # one subject at its limit: mostly denials


def test_memory_bench_smoke(tmp_path: Path) -> None:
    out = tmp_path / "memory.json"
    result = _run("memory.py", "--reservations", "2000", "--out", str(out), timeout_s=120)
    assert "a settled record" in result.stdout
    report = json.loads(out.read_text())
    # Real bytes from Redis's own accounting, each part of a reservation counted.
    assert (
        0 < report["per_settled_record"] < report["per_settled_reservation"] < report["per_open_reservation"]
    )
    assert report["per_subject"] > 0


def test_inprocess_bench_smoke() -> None:
    result = _run("inprocess.py", "--decisions", "2000", "--runs", "1", "--metrics", timeout_s=120)
    assert "CPU per decision" in result.stdout

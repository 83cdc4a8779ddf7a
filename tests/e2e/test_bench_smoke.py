"""The benchmark harness still works: a one-second pass prints the table and writes the JSON.

Benchmarks are not tests: this asserts only that the harness runs end to end and reports
every scenario with real, successful traffic, never on speed.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from quotad_server.store.embedded import EmbeddedRedis

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
    if shutil.which("openssl") is None:  # the smoke measures scenario 1 over TLS too
        pytest.fail("openssl is needed to make the TLS runs' certificates: `make bench-tools`")
    out = tmp_path / "bench.json"
    server = EmbeddedRedis.binary()  # named explicitly, as --redis-server picks another build
    result = _run("run.py", "--smoke", "--out", str(out), "--redis-server", str(server), timeout_s=300)
    assert "decisions/s" in result.stdout
    assert "redis ceiling" in result.stdout
    assert "redis server: valkey" in result.stdout
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
    # quotad serving TLS and mutual TLS, driven in the same pass, every call answered over them
    assert report["tls"]["transports"] == ["tls", "mtls"]
    assert "TLS x plaintext" in result.stdout
    for name, spoken in (("tls", "on"), ("mtls", "mutual")):
        assert reserve[f"{name}_transport"] == spoken  # the load generator's connections: TLS, with a cert
        assert reserve[f"{name}_decisions_per_s"]["median"] > 0
        assert reserve[f"{name}_rpc_errors"] == 0
        assert reserve[f"{name}_item_errors"] == 0
        assert reserve[f"{name}_ratio_to_plaintext"]["median"] > 0
        assert report["tls"]["pooled"][name]["pairs"] == 1  # one point, one pass
    hot = next(row for row in report["summary"] if row["scenario"] == "hot-subject")
    assert hot["allowed_share"]["median"] < 0.5  # one subject at its limit: mostly denials


@pytest.mark.slow
def test_bench_peers_smoke(tmp_path: Path) -> None:
    """envoyproxy/ratelimit beside quotad: driven through Envoy's API by the same load generator,
    every call answered with a code, its figures and the targets in the report."""
    envoy = ROOT / ".tools" / "bin" / "envoy-ratelimit"
    if not envoy.exists():
        pytest.skip("envoy ratelimit is not installed: `make bench-peers`")
    out, markdown = tmp_path / "bench.json", tmp_path / "peers.md"
    args = ("--smoke", "--no-tls", "--peers", "envoy", "--scenarios", "reserve,hot-subject,stream")
    result = _run("run.py", *args, "--out", str(out), "--markdown", str(markdown), timeout_s=300)
    assert "envoyproxy/ratelimit" in result.stdout
    report = json.loads(out.read_text())
    rows = {row["scenario"]: row for row in report["summary"]}
    for scenario in ("reserve", "hot-subject"):
        row = rows[scenario]
        assert row["envoy_decisions_per_s"]["median"] > 0, scenario
        assert row["envoy_rpc_errors"] == 0, scenario
        assert row["envoy_item_errors"] == 0, scenario  # every response read: OK or OVER_LIMIT
        assert row["envoy_decisions_per_server_core"]["median"] > 0, scenario
        assert row["envoy_redis_cpu_us_per_decision"]["median"] > 0, scenario
        assert row["ratio_to_envoy"]["median"] > 0, scenario
    assert rows["reserve"]["envoy_allowed_share"]["median"] > 0.9  # 100,000 subjects, none at a limit
    assert rows["hot-subject"]["envoy_allowed_share"]["median"] < 0.5  # one subject at 20/min
    assert "stream per core / envoy unary per core" in {t["target"] for t in report["targets"]}
    assert "envoyproxy/ratelimit" in markdown.read_text()


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


def test_redis_calls_bench_smoke(tmp_path: Path) -> None:
    out = tmp_path / "calls.json"
    result = _run("redis_calls.py", "--scripts", "5", "--runs", "1", "--out", str(out), timeout_s=120)
    assert "TIME" in result.stdout
    figures = json.loads(out.read_text())["us_per_call"]
    assert len(figures) == 8
    assert all(f["median"] > 0 for f in figures.values())  # each call costs more than the empty loop


def test_cluster_clients_bench_smoke() -> None:
    result = _run("cluster_clients.py", "--calls", "300", "--reshard", "20", "--wait", timeout_s=180)
    rows = {line[:42].strip(): line[42:].split() for line in result.stdout.splitlines()}
    assert "redis-py RedisCluster (asyncio)" in rows
    assert "glide + WAIT 1 100 after each script" in rows
    for label in (
        "quotad RespClient (one node)",
        "valkey-glide GlideClusterClient",
        "quotad GlideCluster (glide + deadlines)",
    ):
        cpu_us, _, errors = rows[label][:3]
        assert float(cpu_us) > 0
        assert errors == "0"  # none of these fails a call, slots moving or not


def test_inprocess_bench_smoke() -> None:
    result = _run("inprocess.py", "--decisions", "2000", "--runs", "1", "--metrics", timeout_s=120)
    assert "CPU per decision" in result.stdout


def test_skew_bench_smoke(tmp_path: Path) -> None:
    out = tmp_path / "skew.json"
    result = _run("skew.py", "--seconds", "2", "--in-flight", "8", "--out", str(out), timeout_s=120)
    assert "Redis CPU/decision" in result.stdout
    runs = json.loads(out.read_text())["rounds"][0]
    assert set(runs) == {"one-partition", "escrow"}
    assert all(run["decisions"] > 0 and run["max_over_admission_tokens"] == 0 for run in runs.values())


def _report(runs: int, ratio: tuple[float, float, float], redis_us: list[float]) -> dict[str, object]:
    median, low, high = ratio
    row = {
        "scenario": "reserve",
        "workers": 1,
        "concurrency": 8,
        "ratio_to_noop_same_scenario": {"median": median, "min": low, "max": high},
        "p99_us": {"median": 5000.0, "min": 4000.0, "max": 6000.0},
        "noop_p99_us": {"median": 4000.0, "min": 4000.0, "max": 4000.0},
        "tls_ratio_to_plaintext": {"median": 0.9, "min": 0.85, "max": 0.95},  # the same in every case
    }
    ceilings = [{"tier": "standard", "subjects": 100_000, "redis_us_per_script": us} for us in redis_us]
    return {
        "commit": "abc1234",
        "date": "2026-11-27",
        "runs": runs,
        "summary": [row],
        "redis_ceiling": ceilings,
    }


@pytest.mark.parametrize(
    ("old", "new", "verdicts"),
    [
        # ranges apart: the ratio rose and Redis got cheaper
        (_report(3, (0.5, 0.45, 0.55), [50, 48, 52]), _report(3, (0.7, 0.65, 0.75), [30, 29, 31]), 2),
        # overlapping ranges: within the noise, no verdict
        (_report(3, (0.5, 0.45, 0.6), [50, 48, 52]), _report(3, (0.58, 0.55, 0.65), [49, 45, 51]), 0),
        # one pass has no range: no verdict however far apart
        (_report(1, (0.5, 0.5, 0.5), [50]), _report(3, (0.7, 0.65, 0.75), [30, 29, 31]), 0),
    ],
)
def test_compare(tmp_path: Path, old: dict[str, object], new: dict[str, object], verdicts: int) -> None:
    (tmp_path / "old.json").write_text(json.dumps(old))
    (tmp_path / "new.json").write_text(json.dumps(new))
    result = _run("compare.py", str(tmp_path / "old.json"), str(tmp_path / "new.json"), timeout_s=60)
    lines = result.stdout.splitlines()
    assert any("x no-op" in line and "0.50" in line for line in lines)
    assert any("redis us/script" in line for line in lines)
    assert any("TLS x plaintext" in line and "0.90" in line for line in lines)
    assert sum(line.rstrip().endswith("better") for line in lines) == verdicts
    assert not any(line.rstrip().endswith("worse") for line in lines)

"""Compare two runs of bench/run.py, say the commit before a change and the change.

    python bench/compare.py OLD.json NEW.json

Decisions/s drift with this shared machine's speed from one run to the next, so the
comparison is of the figures each run measured against its own ceilings: quotad's rate
as a share of the no-op server's and of the script floor's in the same run, its p99 as a
share of the no-op server's, scenario 1's rate with TLS and mutual TLS as a share of its
plaintext rate, and Redis's microseconds per replayed script. Each figure is
the median of the run's passes with their min-max; a change is called out only when the
two ranges do not overlap, since anything less is within this machine's run-to-run noise.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

Spread = dict[str, float]
Row = dict[str, Any]


def _p99_ratio(row: Row) -> Spread | None:
    ours, noop = row.get("p99_us"), row.get("noop_p99_us")
    if not ours or not noop:
        return None
    return {k: ours[k] / max(1.0, noop["median"]) for k in ("median", "min", "max")}


# (label, the figure of a summary row, True when higher is better)
FIGURES: list[tuple[str, Callable[[Row], Spread | None], bool]] = [
    ("x no-op", lambda row: row.get("ratio_to_noop_same_scenario"), True),
    ("x script floor", lambda row: row.get("ratio_to_script_floor"), True),
    ("p99 / no-op p99", _p99_ratio, False),
    ("TLS x plaintext", lambda row: row.get("tls_ratio_to_plaintext"), True),
    ("mTLS x plaintext", lambda row: row.get("mtls_ratio_to_plaintext"), True),
]


def _fmt(value: Spread | None) -> str:
    if value is None:
        return "-"
    return f"{value['median']:.2f} ({value['min']:.2f}-{value['max']:.2f})"


def verdict(old: Spread | None, new: Spread | None, higher_is_better: bool) -> str:
    """'better' or 'worse' when the min-max ranges do not overlap, else ''."""
    if old is None or new is None:
        return ""
    if new["min"] > old["max"]:
        return "better" if higher_is_better else "worse"
    if new["max"] < old["min"]:
        return "worse" if higher_is_better else "better"
    return ""


def _redis_scripts(report: dict[str, Any]) -> dict[tuple[str, int], Spread]:
    by_kind: dict[tuple[str, int], list[float]] = {}
    for ceiling in report.get("redis_ceiling", []):
        if "redis_us_per_script" in ceiling:
            kind = (ceiling["tier"], ceiling["subjects"])
            by_kind.setdefault(kind, []).append(ceiling["redis_us_per_script"])
    return {
        kind: {"median": sorted(v)[len(v) // 2], "min": min(v), "max": max(v)} for kind, v in by_kind.items()
    }


MIN_RUNS = 3  # fewer passes give no range to judge a change by


def compare(old: dict[str, Any], new: dict[str, Any]) -> list[list[str]]:
    """One line per figure present in both runs: scenario, workers, streams, figure, old, new, verdict."""
    judged = min(old.get("runs", 0), new.get("runs", 0)) >= MIN_RUNS
    lines = []
    old_rows = {(r["scenario"], r["workers"], r["concurrency"]): r for r in old["summary"]}
    for row in new["summary"]:
        point = (row["scenario"], row["workers"], row["concurrency"])
        before = old_rows.get(point)
        if before is None:
            continue
        for label, figure, higher_is_better in FIGURES:
            was, now = figure(before), figure(row)
            if was is None and now is None:
                continue
            said = verdict(was, now, higher_is_better) if judged else ""
            lines.append([*map(str, point), label, _fmt(was), _fmt(now), said])
    old_redis = _redis_scripts(old)
    for kind, now in _redis_scripts(new).items():
        was = old_redis.get(kind)
        if was is not None:
            label = f"redis us/script ({kind[0]}, {kind[1]:,} subjects)"
            said = verdict(was, now, False) if judged else ""
            lines.append(["replay", "-", "-", label, _fmt(was), _fmt(now), said])
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("old", type=Path)
    parser.add_argument("new", type=Path)
    args = parser.parse_args()
    old, new = (json.loads(path.read_text()) for path in (args.old, args.new))
    for name, report in (("old", old), ("new", new)):
        print(f"{name}: {report.get('commit', '?')} on {report.get('date', '?')}, {report.get('runs')} runs")
    headers = ["scenario", "w", "c", "figure", "old", "new", ""]
    lines = compare(old, new)
    widths = [max(len(h), *(len(line[i]) for line in lines)) for i, h in enumerate(headers)] if lines else []
    print("  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)))
    for line in lines:
        print("  ".join(v.ljust(w) for v, w in zip(line, widths, strict=True)))
    if not lines:
        print("no figure is in both runs")
    elif min(old.get("runs", 0), new.get("runs", 0)) < MIN_RUNS:
        print(f"no verdicts: a run of fewer than {MIN_RUNS} passes has no range to judge a change by")


if __name__ == "__main__":
    main()

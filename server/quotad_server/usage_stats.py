"""Usage statistics from Commits: what learned output reservations and accuracy reports read.

Kept in Redis as one hash per (model, tier), shared by every replica and bounded:
log-spaced histograms (8 buckets per doubling) plus a few sums, halved whenever the
sample count reaches twice the window, so recent calls weigh most and memory stays
a few hundred fields whatever the traffic.

Fields: "n" commits; "o:<b>" actual output tokens; "ri:<b>" / "ro:<b>" actual/estimate
for input / output tokens; "ei" "ai" "eo" "ao" estimated and actual token sums; "rf"
tokens reserved and refunded; "ov" tokens used beyond the reservation, "ovi" / "ovo" of them
input / output, "nvi" / "nvo" the commits that overran on input / output; "nz" commits
reserved with 0 output (they have no output ratio).

Per max_output_tokens bucket k (see output_bucket): "n<k>" commits and "o<k>:<b>" their
actual output tokens, so calls allowed 64 tokens and calls allowed 4096 learn apart.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

BUCKETS_PER_DOUBLING = 8
ZERO_RATIO = "z"  # actual 0 against a positive estimate


@dataclass(frozen=True, slots=True)
class UsageSample:
    """One committed call: its estimate and what it really used."""

    model: str
    tier: str
    estimated_input: int
    actual_input: int
    estimated_output: int
    actual_output: int
    max_output: int | None = None  # the call's max_output_tokens (0: none); None: not recorded


def output_bucket(max_output_tokens: int) -> int:
    """The bucket of a call's max_output_tokens: k holds [2^(k-1), 2^k), 0 holds calls without one."""
    return max(0, max_output_tokens).bit_length()


def _count_bucket(value: int) -> int:
    return math.floor(math.log2(value + 1) * BUCKETS_PER_DOUBLING)


def _count_upper(bucket: int) -> int:
    """The largest count in a bucket: quantiles round up, so reservations err on the safe side."""
    return math.ceil(2 ** ((bucket + 1) / BUCKETS_PER_DOUBLING) - 1)


def _ratio_bucket(actual: int, estimate: int) -> str:
    if actual == 0:
        return ZERO_RATIO
    return str(round(math.log2(actual / estimate) * BUCKETS_PER_DOUBLING))


def increments(sample: UsageSample) -> dict[str, int]:
    """The hash fields one sample adds to."""
    input_over = max(0, sample.actual_input - sample.estimated_input)
    output_over = max(0, sample.actual_output - sample.estimated_output)
    fields = {
        "n": 1,
        f"o:{_count_bucket(sample.actual_output)}": 1,
        "ei": sample.estimated_input,
        "ai": sample.actual_input,
        "eo": sample.estimated_output,
        "ao": sample.actual_output,
        "rf": max(0, sample.estimated_input - sample.actual_input)
        + max(0, sample.estimated_output - sample.actual_output),
        "ov": input_over + output_over,
    }
    for name, value in (("ovi", input_over), ("ovo", output_over)):
        if value:
            fields[name] = value
            fields["nv" + name[-1]] = 1
    if not sample.estimated_output:
        fields["nz"] = 1
    if sample.max_output is not None:
        bucket = output_bucket(sample.max_output)
        fields[f"n{bucket}"] = 1
        fields[f"o{bucket}:{_count_bucket(sample.actual_output)}"] = 1
    if sample.estimated_input:
        fields[f"ri:{_ratio_bucket(sample.actual_input, sample.estimated_input)}"] = 1
    if sample.estimated_output:
        fields[f"ro:{_ratio_bucket(sample.actual_output, sample.estimated_output)}"] = 1
    return fields


def _histogram(stats: Mapping[str, int], prefix: str) -> list[tuple[float, int]]:
    """(sort key, count) for the fields under `prefix`."""
    found = []
    for name, count in stats.items():
        if name.startswith(prefix) and count > 0:
            bucket = name[len(prefix) :]
            found.append((-math.inf if bucket == ZERO_RATIO else float(bucket), count))
    return sorted(found)


def _quantile_bucket(histogram: list[tuple[float, int]], quantile: float) -> float | None:
    total = sum(count for _, count in histogram)
    if total == 0:
        return None
    seen = 0
    for bucket, count in histogram:
        seen += count
        if seen >= quantile * total:
            return bucket
    return histogram[-1][0]


def output_quantile(
    stats: Mapping[str, int], quantile: float, min_samples: int, max_output_bucket: int | None = None
) -> int | None:
    """The `quantile` of actual output tokens (rounded up to its bucket), or None with too few samples:
    of every call, or of the calls whose max_output_tokens fell in `max_output_bucket`."""
    suffix = "" if max_output_bucket is None else str(max_output_bucket)
    if stats.get("n" + suffix, 0) < min_samples:
        return None
    bucket = _quantile_bucket(_histogram(stats, f"o{suffix}:"), quantile)
    return None if bucket is None else _count_upper(int(bucket))


def ratio_quantile(stats: Mapping[str, int], prefix: str, quantile: float) -> float:
    """The `quantile` of actual/estimate under `prefix` ("ri:" or "ro:"); 0 when there is none."""
    bucket = _quantile_bucket(_histogram(stats, prefix), quantile)
    if bucket is None or bucket == -math.inf:
        return 0.0
    return float(2 ** (bucket / BUCKETS_PER_DOUBLING))


def merge(all_stats: list[Mapping[str, int]]) -> dict[str, int]:
    merged: dict[str, int] = {}
    for stats in all_stats:
        for name, count in stats.items():
            merged[name] = merged.get(name, 0) + count
    return merged

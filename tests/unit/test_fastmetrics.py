"""quotad's lock-free counters and histograms expose exactly what prometheus_client's would."""

from __future__ import annotations

import re

import prometheus_client
import pytest
from prometheus_client import CollectorRegistry, generate_latest
from quotad_server import fastmetrics

BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
OBSERVED = [0.0, 0.0005, 0.0007, 0.001, 0.003, 0.25, 2.5, 3.0, 1e9, 0.01]


def _exposition(registry: CollectorRegistry) -> str:
    text = generate_latest(registry).decode()
    return re.sub(r"(_created\{?.*?\}?) [0-9.e+]+\n", r"\1 T\n", text)  # creation times differ


def _drive(counter_type: type, histogram_type: type) -> str:
    registry = CollectorRegistry(auto_describe=True)
    labelled = counter_type("quotad_things", "Things.", ["kind", "model"], registry=registry)
    plain = counter_type("quotad_plain", "Unlabelled.", registry=registry)
    timing = histogram_type("quotad_seconds", "Time.", ["method"], buckets=BUCKETS, registry=registry)
    counter_type("quotad_unused", "Never incremented.", ["kind"], registry=registry)
    labelled.labels("input", "gpt-4o").inc(800)
    labelled.labels("input", "gpt-4o").inc()
    labelled.labels("output", "").inc(0.5)
    plain.inc()
    for value in OBSERVED:
        timing.labels("CheckAndReserve").observe(value)
    timing.labels("Commit").observe(0.002)
    return _exposition(registry)


def test_exposition_is_prometheus_clients() -> None:
    ours = _drive(fastmetrics.Counter, fastmetrics.Histogram)
    theirs = _drive(prometheus_client.Counter, prometheus_client.Histogram)
    assert ours == theirs
    assert 'quotad_seconds_bucket{le="0.001",method="CheckAndReserve"} 4.0' in ours  # bounds are inclusive
    assert 'quotad_seconds_count{method="CheckAndReserve"} 10.0' in ours


def test_misuse_is_refused() -> None:
    registry = CollectorRegistry()
    counter = fastmetrics.Counter("quotad_c", "C.", ["kind"], registry=registry)
    with pytest.raises(ValueError, match="only increase"):
        counter.labels("a").inc(-1)
    with pytest.raises(ValueError, match="expected labels"):
        counter.labels("a", "b")
    with pytest.raises(ValueError, match="increasing"):
        fastmetrics.Histogram("quotad_h", "H.", buckets=(1.0, 0.5), registry=registry)

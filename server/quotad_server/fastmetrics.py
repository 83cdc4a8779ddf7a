"""Counters and histograms for the decision path, exposed like prometheus_client's own.

prometheus_client's Counter and Histogram take a lock on every update, so they are safe
to update from any thread. quotad updates its metrics only from its event loop, one
thread, about five times per decision; there the locks cost more than the rest of the
metrics. These keep plain numbers that only the event loop writes, and turn them into
metric families when a scrape (on the endpoint's own thread) reads them.

The exposition is prometheus_client's: the same names, `_total`, `_bucket` (cumulative,
`le` formatted the same way), `_count`, `_sum` and `_created` series. A scrape reads each
number whole, never a torn one; a histogram's count is the sum of the bucket counts
it read, so its buckets always add up, and its sum may lag by an observation in flight.

Only the thread running the event loop may update them.
"""

from __future__ import annotations

import bisect
import time
from collections.abc import Iterator, Sequence

from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector, CollectorRegistry
from prometheus_client.samples import Sample
from prometheus_client.utils import floatToGoString


class CounterChild:
    """One labelled series of a counter."""

    __slots__ = ("created", "value")

    def __init__(self) -> None:
        self.value = 0.0
        self.created = time.time()

    def inc(self, amount: float = 1) -> None:
        if amount < 0:
            raise ValueError("counters can only increase")
        self.value += amount


class HistogramChild:
    """One labelled series of a histogram: a count per bucket (the last is +Inf) and the sum."""

    __slots__ = ("bounds", "counts", "created", "sum")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)
        self.sum = 0.0
        self.created = time.time()

    def observe(self, value: float) -> None:
        # The first bucket whose upper bound is >= value (bounds are inclusive, as `le` says).
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.sum += value


class _Family(Collector):
    def __init__(self, name: str, documentation: str, labelnames: Sequence[str], registry: CollectorRegistry):
        self._name = name
        self._documentation = documentation
        self._labelnames = tuple(labelnames)
        registry.register(self)

    def describe(self) -> Iterator[Metric]:
        return iter((self._family(),))

    def _family(self) -> Metric:
        raise NotImplementedError


class Counter(_Family):
    """A counter family: `labels(*values)` gives the series to `inc()`."""

    def __init__(
        self,
        name: str,
        documentation: str,
        labelnames: Sequence[str] = (),
        *,
        registry: CollectorRegistry,
    ) -> None:
        self._children: dict[tuple[str, ...], CounterChild] = {}
        super().__init__(name, documentation, labelnames, registry)
        if not self._labelnames:
            self.labels()  # an unlabelled counter is exposed from the start, at 0

    def labels(self, *values: str) -> CounterChild:
        child = self._children.get(values)
        if child is None:
            if len(values) != len(self._labelnames):
                raise ValueError(f"{self._name}: expected labels {self._labelnames}, got {values}")
            child = self._children[values] = CounterChild()
        return child

    def inc(self, amount: float = 1) -> None:
        """For an unlabelled counter."""
        self.labels().inc(amount)

    def _family(self) -> Metric:
        return CounterMetricFamily(self._name, self._documentation, labels=self._labelnames)

    def collect(self) -> Iterator[Metric]:
        family = CounterMetricFamily(self._name, self._documentation, labels=self._labelnames)
        for values, child in list(self._children.items()):
            family.add_metric(values, child.value, created=child.created)
        yield family


class Histogram(_Family):
    """A histogram family: `labels(*values)` gives the series to `observe()`."""

    def __init__(
        self,
        name: str,
        documentation: str,
        labelnames: Sequence[str] = (),
        *,
        buckets: Sequence[float],
        registry: CollectorRegistry,
    ) -> None:
        self._bounds = tuple(float(bound) for bound in buckets)
        if list(self._bounds) != sorted(set(self._bounds)):
            raise ValueError(f"{name}: buckets must be increasing")
        self._children: dict[tuple[str, ...], HistogramChild] = {}
        super().__init__(name, documentation, labelnames, registry)

    def labels(self, *values: str) -> HistogramChild:
        child = self._children.get(values)
        if child is None:
            if len(values) != len(self._labelnames):
                raise ValueError(f"{self._name}: expected labels {self._labelnames}, got {values}")
            child = self._children[values] = HistogramChild(self._bounds)
        return child

    def _family(self) -> Metric:
        return HistogramMetricFamily(self._name, self._documentation, labels=self._labelnames)

    def collect(self) -> Iterator[Metric]:
        family = HistogramMetricFamily(self._name, self._documentation, labels=self._labelnames)
        les = [floatToGoString(bound) for bound in self._bounds]  # type: ignore[no-untyped-call]
        les.append("+Inf")
        for values, child in list(self._children.items()):
            counts = list(child.counts)  # one read of every bucket; the count is their sum
            cumulative, total = [], 0
            for le, count in zip(les, counts, strict=True):
                total += count
                cumulative.append((le, float(total)))
            family.add_metric(values, cumulative, child.sum)
            labels = dict(zip(self._labelnames, values, strict=True))
            family.samples.append(Sample(f"{self._name}_created", labels, child.created))
        yield family

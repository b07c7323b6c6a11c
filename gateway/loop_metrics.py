"""Counters and histograms written on every request, without prometheus_client's per-value lock.

prometheus_client takes a lock on each increment (a histogram observation is two), and a
request through the gateway makes about a dozen of them: ~9 µs of CPU per upstream request,
measured in process with bench/upstream_cpu.py. These metrics are written only from the event
loop's thread (middleware, services, upstream backends), so a plain integer in a list is safe
there; a scrape (any thread) reads them through a collector and exports the same families,
names, labels and buckets as prometheus_client's own Counter and Histogram. Metrics that compute
threads write (the local engine's) stay prometheus_client's, which are thread-safe.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Iterator, Sequence

from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import CollectorRegistry
from prometheus_client.utils import floatToGoString


class CounterChild:
    __slots__ = ("value",)

    def __init__(self) -> None:
        self.value = 0.0

    def inc(self, amount: float = 1) -> None:
        if amount < 0:
            raise ValueError("counters only go up")
        self.value += amount


class HistogramChild:
    __slots__ = ("bounds", "counts", "sum")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)  # the last: above every bound (+Inf only)
        self.sum = 0.0

    def observe(self, value: float) -> None:
        # bisect_left: the first bound >= value, Prometheus's `le` (less than or equal)
        self.counts[bisect_left(self.bounds, value)] += 1
        self.sum += value


class _Family:
    """Children by label values, as prometheus_client's `labels(*values)` hands them out."""

    def __init__(self, name: str, documentation: str, labelnames: Sequence[str], registry: CollectorRegistry) -> None:
        self.name = name
        self.documentation = documentation
        self.labelnames = tuple(labelnames)
        self._children: dict[tuple[str, ...], CounterChild | HistogramChild] = {}
        registry.register(self)

    def _child(self, values: tuple[str, ...]) -> CounterChild | HistogramChild:
        child = self._children.get(values)
        if child is None:
            if len(values) != len(self.labelnames):
                raise ValueError(f"{self.name} takes labels {self.labelnames}, got {values}")
            child = self._children[values] = self._new()
        return child

    def _new(self) -> CounterChild | HistogramChild:
        raise NotImplementedError

    def _items(self) -> list[tuple[tuple[str, ...], CounterChild | HistogramChild]]:
        return list(self._children.items())  # a copy: the loop may add a child during a scrape

    def describe(self) -> list[Metric]:
        return list(self._families([]))

    def collect(self) -> Iterator[Metric]:
        return self._families(self._items())

    def _families(self, items: list[tuple[tuple[str, ...], CounterChild | HistogramChild]]) -> Iterator[Metric]:
        raise NotImplementedError


class LoopCounter(_Family):
    def labels(self, *values: str) -> CounterChild:
        child = self._child(tuple(str(v) for v in values))
        assert isinstance(child, CounterChild)
        return child

    def _new(self) -> CounterChild:
        return CounterChild()

    def _families(self, items: list[tuple[tuple[str, ...], CounterChild | HistogramChild]]) -> Iterator[Metric]:
        family = CounterMetricFamily(self.name, self.documentation, labels=self.labelnames)
        for values, child in items:
            assert isinstance(child, CounterChild)
            family.add_metric(list(values), child.value)
        yield family


class LoopHistogram(_Family):
    def __init__(
        self,
        name: str,
        documentation: str,
        labelnames: Sequence[str],
        registry: CollectorRegistry,
        buckets: Sequence[float],
    ) -> None:
        self.bounds = tuple(sorted(float(b) for b in buckets if b != float("inf")))
        self._le = [floatToGoString(b) for b in self.bounds]
        super().__init__(name, documentation, labelnames, registry)

    def labels(self, *values: str) -> HistogramChild:
        child = self._child(tuple(str(v) for v in values))
        assert isinstance(child, HistogramChild)
        return child

    def _new(self) -> HistogramChild:
        return HistogramChild(self.bounds)

    def _families(self, items: list[tuple[tuple[str, ...], CounterChild | HistogramChild]]) -> Iterator[Metric]:
        family = HistogramMetricFamily(self.name, self.documentation, labels=self.labelnames)
        for values, child in items:
            assert isinstance(child, HistogramChild)
            counts, total = list(child.counts), child.sum
            cumulative, running = [], 0
            for le, count in zip([*self._le, "+Inf"], counts, strict=True):
                running += count
                cumulative.append((le, running))
            family.add_metric(list(values), cumulative, sum_value=total)
        yield family

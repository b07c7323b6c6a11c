"""gateway.loop_metrics exports exactly what prometheus_client's own Counter and Histogram would
for the same observations (names, labels, `le` texts, cumulative counts, sums)."""

from __future__ import annotations

import random

import pytest
from prometheus_client import CollectorRegistry, Counter, Histogram

from gateway.loop_metrics import LoopCounter, LoopHistogram

BUCKETS = (0.005, 0.01, 0.025, 0.1, 1, 2.5, 60)


def _samples(registry: CollectorRegistry) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in registry.collect()
        for s in family.samples
        if not s.name.endswith("_created")  # prometheus_client's creation time: not exported by ours
    }


def test_same_samples_as_prometheus_client() -> None:
    ours, theirs = CollectorRegistry(), CollectorRegistry()
    counters = (LoopCounter("c", "doc", ["a", "b"], registry=ours), Counter("c", "doc", ["a", "b"], registry=theirs))
    histograms = (
        LoopHistogram("h", "doc", ["m"], registry=ours, buckets=BUCKETS),
        Histogram("h", "doc", ["m"], registry=theirs, buckets=BUCKETS),
    )
    rng = random.Random(7)
    values = [*BUCKETS, 0.0, 1000.0, *(rng.uniform(0, 3) for _ in range(500))]  # bounds exactly: `le`
    for value in values:
        model = rng.choice(["x", "y"])
        for histogram in histograms:
            histogram.labels(model).observe(value)
        for counter in counters:
            counter.labels(model, 200).inc(3)
            counter.labels("z", "w").inc()
    got, want = _samples(ours), _samples(theirs)
    assert got.keys() == want.keys()
    for key, value in want.items():
        assert got[key] == pytest.approx(value, rel=1e-12), key


def test_counter_refuses_a_decrease_and_wrong_labels() -> None:
    counter = LoopCounter("c", "doc", ["a"], registry=CollectorRegistry())
    with pytest.raises(ValueError):
        counter.labels("x").inc(-1)
    with pytest.raises(ValueError):
        counter.labels("x", "y")

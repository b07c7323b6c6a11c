"""One model's samples from a live server's /metrics, as the Prometheus parser reads them."""

from __future__ import annotations

import httpx
from prometheus_client.parser import text_string_to_metric_families


def model_samples(url: str, model: str) -> dict[str, float]:
    """Samples labelled with `model`, by name; histogram buckets as 'name@le', e.g.
    'gateway_queue_time_seconds_bucket@0.25'."""
    samples: dict[str, float] = {}
    for family in text_string_to_metric_families(httpx.get(f"{url}/metrics").text):
        for sample in family.samples:
            if sample.labels.get("model") == model:
                le = sample.labels.get("le")
                samples[sample.name if le is None else f"{sample.name}@{le}"] = sample.value
    return samples


def grew(before: dict[str, float], after: dict[str, float], name: str) -> float:
    """How much a counter-like sample (a histogram's count, sum or bucket) grew between two reads."""
    return after.get(name, 0.0) - before.get(name, 0.0)

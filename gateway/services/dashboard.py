"""The live dashboard's numbers (GET /ui/api/dashboard), read from the Prometheus registry that /metrics
exposes, so the page and a Prometheus server never disagree.

Rates and latency percentiles are computed here, over a sliding window: each call reads the registry,
compares it with an earlier reading kept in `AppState.metric_snapshots` (the newest one at least
WINDOW seconds old, else the oldest one), and keeps its own reading for later calls. The server does
it rather than the page so every open page, and any script, sees the same numbers from one GET.
Percentiles interpolate within histogram buckets, as Prometheus's histogram_quantile does.
"""

from __future__ import annotations

import math
import time
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from gateway.services import models
from gateway.services.gauges import refresh_gauges
from gateway.state import AppState

WINDOW = 10.0  # seconds the rates and percentiles look back over
MIN_GAP = 1.0  # a reading is kept only this long after the previous kept one (many pages, one history)
QUANTILES = (0.5, 0.9, 0.99)
# Requests the dashboard does not count as traffic: its own polling, the pages, probes and scrapes.
NOT_TRAFFIC = ("/ui", "/metrics", "/health", "/ready")

Buckets = dict[float, float]  # upper bound -> cumulative count


@dataclass
class Reading:
    """The counters and histograms at one moment (histograms summed over models)."""

    at: float
    counters: dict[str, float] = field(default_factory=lambda: defaultdict(float))
    histograms: dict[str, Buckets] = field(default_factory=lambda: defaultdict(lambda: defaultdict(float)))


@dataclass
class Gauges:
    states: dict[str, str] = field(default_factory=dict)  # model -> state
    waiting: dict[str, float] = field(default_factory=dict)
    running: dict[str, float] = field(default_factory=dict)
    cooling: dict[str, bool] = field(default_factory=dict)  # deployment label -> cooled down
    outcomes: dict[str, dict[str, float]] = field(default_factory=lambda: defaultdict(dict))


def _status_class(status: str) -> str:
    return f"{status[0]}xx" if status[:1].isdigit() else "other"


def _counter(reading: Reading, name: str, labels: dict[str, str], value: float) -> None:
    if name == "gateway_requests_total":
        if not labels.get("route", "").startswith(NOT_TRAFFIC):
            reading.counters[f"requests.{_status_class(labels.get('status', ''))}"] += value
    elif name == "gateway_generation_tokens_total":
        reading.counters["output_tokens"] += value
    elif name == "gateway_prompt_tokens_total":
        reading.counters["prompt_tokens"] += value
    elif name == "gateway_upstream_retries_total":
        reading.counters["upstream_retries"] += value
    elif name == "gateway_upstream_fallbacks_total":
        reading.counters["upstream_fallbacks"] += value


_HISTOGRAMS = {
    "gateway_time_to_first_token_seconds_bucket": "ttft",
    "gateway_inter_token_latency_seconds_bucket": "itl",
}


def _gauge(gauges: Gauges, name: str, labels: dict[str, str], value: float) -> None:
    if name == "gateway_model_state" and value == 1:
        gauges.states[labels["model"]] = labels["state"]
    elif name == "gateway_queue_depth":
        gauges.waiting[labels["model"]] = value
    elif name == "gateway_running_requests":
        gauges.running[labels["model"]] = value
    elif name == "gateway_upstream_cooldown":
        gauges.cooling[labels["deployment"]] = value == 1
    elif name == "gateway_upstream_requests_total":
        gauges.outcomes[labels["deployment"]][labels["outcome"]] = value


def read(samples: Iterable[tuple[str, dict[str, str], float]], at: float) -> tuple[Reading, Gauges]:
    """One pass over the registry's samples: (name, labels, value) as prometheus_client collects them."""
    reading, gauges = Reading(at), Gauges()
    reading.counters.update(dict.fromkeys((*RATE_KEYS, "prompt_tokens"), 0.0))  # every total, zero before traffic
    for name, labels, value in samples:
        hist = _HISTOGRAMS.get(name)
        if hist is not None:
            reading.histograms[hist][float(labels["le"])] += value
        else:
            _counter(reading, name, labels, value)
            _gauge(gauges, name, labels, value)
    return reading, gauges


def quantile(q: float, buckets: Buckets) -> float | None:
    """The q-quantile of a cumulative histogram, interpolated linearly within its bucket; None when empty."""
    bounds = sorted(buckets)
    total = buckets[bounds[-1]] if bounds else 0.0
    if total <= 0:
        return None
    rank = q * total
    lower, below = 0.0, 0.0
    for bound in bounds:
        count = buckets[bound]
        if count >= rank:
            if math.isinf(bound):  # past the last finite bound: that bound is all that is known
                return lower
            if count == below:
                return bound
            return lower + (bound - lower) * (rank - below) / (count - below)
        lower, below = bound, count
    return lower


RATE_KEYS = (
    "requests.2xx",
    "requests.4xx",
    "requests.5xx",
    "output_tokens",
    "upstream_retries",
    "upstream_fallbacks",
)


def _latency(now: Reading, then: Reading) -> dict[str, dict[str, float | None]]:
    """Percentiles of the observations made between two readings (bucket counts subtracted)."""
    latency: dict[str, dict[str, float | None]] = {}
    for hist in _HISTOGRAMS.values():
        earlier = then.histograms.get(hist, {})
        window = {b: max(c - earlier.get(b, 0.0), 0.0) for b, c in now.histograms.get(hist, {}).items()}
        stats: dict[str, float | None] = {f"p{round(q * 100)}": quantile(q, window) for q in QUANTILES}
        stats["count"] = max(window.values(), default=0.0)
        latency[hist] = stats
    return latency


def _window(now: Reading, then: Reading | None) -> dict[str, Any]:
    """Rates per second and latency percentiles between two readings (None without an earlier one)."""
    if then is None or now.at <= then.at:
        empty = {f"p{round(q * 100)}": None for q in QUANTILES} | {"count": None}
        return {
            "seconds": None,
            "rates": dict.fromkeys(RATE_KEYS),
            "latency": {h: dict(empty) for h in _HISTOGRAMS.values()},
        }
    seconds = now.at - then.at
    rates = {k: max(now.counters.get(k, 0.0) - then.counters.get(k, 0.0), 0.0) / seconds for k in RATE_KEYS}
    return {"seconds": seconds, "rates": rates, "latency": _latency(now, then)}


def _baseline(history: Any, now: float) -> Reading | None:
    """The newest kept reading at least WINDOW old, else the oldest kept one (a page just opened)."""
    old_enough = [r for r in history if now - r.at >= WINDOW]
    if old_enough:
        return old_enough[-1]
    return history[0] if history else None


def _models(state: AppState, gauges: Gauges) -> list[dict[str, Any]]:
    out = []
    for summary in models.all_models(state):
        name = summary["name"]
        deployments = [
            {
                "name": dep,
                "backend": kind,
                "state": "cooling_down" if gauges.cooling.get(f"{name}/{dep}") else "healthy",
                "requests": gauges.outcomes.get(f"{name}/{dep}", {}),
            }
            for dep, kind in summary["deployments"] or []
        ]
        out.append(
            {
                "name": name,
                "task": summary["task"],
                "backend": summary["backend"],
                "state": gauges.states.get(name, summary["state"]),
                "error": summary["error"],
                "waiting": gauges.waiting.get(name),
                "running": gauges.running.get(name),
                "deployments": deployments,
            }
        )
    return out


def _samples(state: AppState) -> Iterable[tuple[str, dict[str, str], float]]:
    for family in state.metrics.registry.collect():
        for sample in family.samples:
            yield sample.name, sample.labels, sample.value


def dashboard(state: AppState) -> dict[str, Any]:
    refresh_gauges(state)
    now = time.monotonic()
    reading, gauges = read(_samples(state), now)
    history = state.metric_snapshots
    window = _window(reading, _baseline(history, now))
    if not history or now - history[-1].at >= MIN_GAP:
        history.append(reading)
    return {
        "time": time.time(),
        "uptime_seconds": time.time() - state.started_at,
        "window": window,
        "totals": dict(reading.counters),
        "queue": {"waiting": sum(gauges.waiting.values()), "running": sum(gauges.running.values())},
        "models": _models(state, gauges),
    }

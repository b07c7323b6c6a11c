"""Gauges read at scrape time: model states and the local engines' queues (for /metrics and the dashboard)."""

from __future__ import annotations

from gateway.domain import ModelState
from gateway.state import AppState


def refresh_gauges(state: AppState) -> None:
    m = state.metrics
    for entry in state.registry.entries:
        for s in ModelState:
            m.model_state.labels(entry.spec.name, s.value).set(1 if entry.backend.state == s else 0)
        stats = entry.backend.queue_stats()
        if stats is not None:
            m.queue_depth.labels(entry.spec.name).set(stats.waiting)
            m.running_requests.labels(entry.spec.name).set(stats.running)

"""Gauges read at scrape time: model states, memory and the local engines' queues (for /metrics and the dashboard)."""

from __future__ import annotations

from gateway.domain import ModelState
from gateway.state import AppState


def refresh_gauges(state: AppState) -> None:
    m = state.metrics
    # models come and go at run time: only the served (and loaded) ones are reported
    for gauge in (m.model_state, m.model_memory, m.queue_depth, m.running_requests, m.queue_capacity, m.prefix_blocks):
        gauge.clear()
    for device, limit in state.registry.budget.devices().items():
        m.memory_budget.labels(device).set(limit)
    for entry in state.registry.entries:
        if (memory := entry.backend.memory_use()) is not None:
            m.model_memory.labels(entry.spec.name, memory.device, "measured").set(memory.bytes)
            m.model_memory.labels(entry.spec.name, memory.device, "rss_delta").set(memory.rss_delta or 0)
        for s in ModelState:
            m.model_state.labels(entry.spec.name, s.value).set(1 if entry.backend.state == s else 0)
        stats = entry.backend.queue_stats()
        if stats is not None:
            m.queue_depth.labels(entry.spec.name).set(stats.waiting)
            m.running_requests.labels(entry.spec.name).set(stats.running)
            if stats.capacity is not None:
                m.queue_capacity.labels(entry.spec.name).set(stats.capacity)
            if stats.prefix_blocks is not None:
                m.prefix_blocks.labels(entry.spec.name, "used").set(stats.prefix_blocks[0])
                m.prefix_blocks.labels(entry.spec.name, "capacity").set(stats.prefix_blocks[1])

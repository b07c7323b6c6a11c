"""Typed application state (no FastAPI here: its dependencies live in routes/common/deps.py)."""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from gateway.auth.access import Access
from gateway.backends.registry import Registry
from gateway.config import Settings
from gateway.drain import Drain
from gateway.metrics import Metrics


@dataclass
class AppState:
    settings: Settings
    registry: Registry
    metrics: Metrics
    access: Access = field(default_factory=lambda: Access([], None))
    drain: Drain = field(default_factory=Drain)
    started_at: int = field(default_factory=lambda: int(time.time()))
    # Reads the configuration again (the same file, environment and flags): config reload, SIGHUP.
    settings_source: Callable[[], Settings] | None = None
    loop: asyncio.AbstractEventLoop | None = None  # the app's loop once it has started (signal handlers)
    tasks: set[asyncio.Future[None]] = field(default_factory=set)  # background work kept referenced
    # services/dashboard.py's earlier readings of the metrics, bounded: rates are differences over them
    metric_snapshots: deque[Any] = field(default_factory=lambda: deque(maxlen=64))

    def background(self, task: asyncio.Future[None]) -> None:
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

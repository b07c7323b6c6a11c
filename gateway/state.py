"""Typed application state (no FastAPI here: its dependencies live in routes/common/deps.py)."""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from gateway.backends.registry import Registry
from gateway.config import Settings
from gateway.metrics import Metrics


@dataclass
class AppState:
    settings: Settings
    registry: Registry
    metrics: Metrics
    started_at: int = field(default_factory=lambda: int(time.time()))
    # services/dashboard.py's earlier readings of the metrics, bounded: rates are differences over them
    metric_snapshots: deque[Any] = field(default_factory=lambda: deque(maxlen=64))

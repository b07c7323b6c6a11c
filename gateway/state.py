"""Typed application state (no FastAPI here: its dependencies live in routes/common/deps.py)."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

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

"""Typed application state and the FastAPI dependencies that read it."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Annotated

from fastapi import Depends, Request

from gateway.backends.registry import Registry
from gateway.config import Settings
from gateway.metrics import Metrics


@dataclass
class AppState:
    settings: Settings
    registry: Registry
    metrics: Metrics
    started_at: int = field(default_factory=lambda: int(time.time()))


async def get_state(request: Request) -> AppState:
    # async on purpose: FastAPI runs a plain `def` dependency in a worker thread, a thread
    # hop per request that measurably slowed the upstream hot path (bench/upstream_overhead.py).
    return request.app.state.gateway


StateDep = Annotated[AppState, Depends(get_state)]

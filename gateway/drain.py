"""Graceful drain: on SIGTERM the gateway stops taking work, lets what it holds finish for up to
`server.drain_timeout`, then ends what is left cleanly (streams with an in-band error and
`[DONE]`, other requests with a JSON error) before uvicorn is told to exit.

The middleware registers each request's task here; `gateway.server.GatewayServer` starts `run`.
"""

from __future__ import annotations

import asyncio
import logging
import time

from gateway import logs

log = logging.getLogger(__name__)


class Drain:
    def __init__(self) -> None:
        self.draining = False  # new requests are refused, /ready is 503
        self.expired = False  # the grace period is over: requests still running are being ended
        self.inflight: set[asyncio.Task[object]] = set()
        self._idle: asyncio.Event | None = None

    def enter(self, task: asyncio.Task[object]) -> None:
        self.inflight.add(task)

    def leave(self, task: asyncio.Task[object]) -> None:
        self.inflight.discard(task)
        if self._idle is not None and not self.inflight:
            self._idle.set()

    async def run(self, timeout: float) -> None:
        """Drain: wait for in-flight requests up to `timeout`, then end the rest."""
        self.draining = True
        started = time.monotonic()
        log.info("draining: %d requests in flight, up to %.1fs", len(self.inflight), timeout)
        if self.inflight:
            self._idle = asyncio.Event()
            try:
                await asyncio.wait_for(self._idle.wait(), timeout)
            except asyncio.TimeoutError:
                pass
        left = list(self.inflight)
        if left:
            self.expired = True
            log.warning("drain timeout: ending %d requests still in flight", len(left))
            for task in left:
                task.cancel("drain timeout")
            await asyncio.wait(left, timeout=5.0)
        log.info("drained in %.2fs", time.monotonic() - started)
        logs.flush()  # the drained requests' lines are out before the process may be killed

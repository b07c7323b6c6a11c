"""Dynamic micro-batching for encoder models: concurrent requests share one forward pass.

Requests wait in a bounded queue; a worker takes the oldest, gathers the queued
requests that can share its call (same key: same task and parameters) up to
`max_batch_size` inputs, runs them as one batch on the model's compute thread and
scatters the outputs back. It waits up to `max_wait_ms` for company only while
requests are arriving concurrently (the previous batch held more than one), so a
lone client pays no wait. When a shared batch fails, its requests are rerun one
by one, so an error reaches only the request that caused it.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable, Hashable
from concurrent.futures import Executor
from dataclasses import dataclass, field
from typing import Any

from gateway.engine.runtime.observer import EngineObserver, NoObserver
from gateway.errors import Overloaded

BatchFunction = Callable[[list[Any]], list[Any]]


@dataclass(eq=False)
class _Job:
    key: Hashable
    items: list[Any]
    run: BatchFunction
    future: asyncio.Future[list[Any]]
    enqueued_at: float = field(default_factory=time.monotonic)


class MicroBatcher:
    def __init__(
        self, name: str, executor: Executor, *, max_batch_size: int, max_wait_ms: float, max_queue: int
    ) -> None:
        self.name = name
        self.executor = executor
        self.max_batch_size = max_batch_size
        self.max_wait = max_wait_ms / 1000
        self.max_queue = max_queue
        self.observer: EngineObserver = NoObserver()
        self.running = 0  # requests in the batch being computed
        self._pending: deque[_Job] = deque()
        self._arrived: asyncio.Event | None = None
        self._worker: asyncio.Task[None] | None = None
        self._last_batch = 1
        self._items_per_second = 50.0  # refined by every batch; feeds Retry-After

    def queue_depth(self) -> int:
        return len(self._pending)

    async def run(self, key: Hashable, items: list[Any], run: BatchFunction) -> list[Any]:
        """`run(items)` for these items, batched with other requests of the same `key`."""
        if len(self._pending) >= self.max_queue:
            waiting = sum(len(job.items) for job in self._pending)
            raise Overloaded(
                f"Model '{self.name}' has {len(self._pending)} requests waiting; try again later.",
                retry_after=waiting / self._items_per_second,
            )
        self._ensure_worker()
        assert self._arrived is not None
        job = _Job(key, items, run, asyncio.get_running_loop().create_future())
        self._pending.append(job)
        self._arrived.set()
        return await job.future

    async def close(self) -> None:
        if self._worker is not None:
            self._worker.cancel()

    # worker ----------------------------------------------------------------
    def _ensure_worker(self) -> None:
        if self._worker is None or self._worker.done():
            self._arrived = asyncio.Event()
            self._worker = asyncio.get_running_loop().create_task(self._work(), name=f"batch:{self.name}")

    def _companions(self, key: Hashable) -> int:
        return sum(len(job.items) for job in self._pending if job.key == key and not job.future.done())

    async def _gather(self, first: _Job) -> None:
        """Wait (at most until `first` has waited max_wait) for more inputs to share its batch."""
        assert self._arrived is not None
        if self._last_batch <= 1 or self.max_wait <= 0:
            return
        deadline = first.enqueued_at + self.max_wait
        while self._companions(first.key) < self.max_batch_size:
            left = deadline - time.monotonic()
            if left <= 0:
                return
            self._arrived.clear()
            try:
                await asyncio.wait_for(self._arrived.wait(), left)
            except asyncio.TimeoutError:  # (an alias of TimeoutError from Python 3.11)
                return

    def _take(self, key: Hashable) -> list[_Job]:
        """The oldest requests with `key`, up to max_batch_size inputs (a bigger request runs alone)."""
        batch: list[_Job] = []
        count = 0
        for job in list(self._pending):
            if job.future.done():  # its client left while it waited
                self._pending.remove(job)
                continue
            if job.key != key or (batch and count + len(job.items) > self.max_batch_size):
                continue
            self._pending.remove(job)
            batch.append(job)
            count += len(job.items)
            if count >= self.max_batch_size:
                break
        return batch

    async def _work(self) -> None:
        assert self._arrived is not None
        while True:
            while not self._pending:
                self._arrived.clear()
                await self._arrived.wait()
            first = self._pending[0]
            if first.future.done():
                self._pending.popleft()
                continue
            await self._gather(first)
            batch = self._take(first.key)
            if batch:
                await self._compute(batch)

    async def _compute(self, batch: list[_Job]) -> None:
        loop = asyncio.get_running_loop()
        items = [item for job in batch for item in job.items]
        started = time.monotonic()
        for job in batch:
            self.observer.queued(started - job.enqueued_at)
        self.running, self._last_batch = len(batch), len(batch)
        try:
            outputs = await loop.run_in_executor(self.executor, batch[0].run, items)
        except Exception as exc:
            if len(batch) == 1:
                _settle(batch[0], exc)
                return
            for job in batch:  # find the request that broke the batch; the others still get answers
                try:
                    _settle(job, await loop.run_in_executor(self.executor, job.run, job.items))
                except Exception as single:
                    _settle(job, single)
            return
        finally:
            self.running = 0
        elapsed = max(time.monotonic() - started, 1e-6)
        self.observer.stepped(len(items), elapsed)
        self._items_per_second = 0.8 * self._items_per_second + 0.2 * (len(items) / elapsed)
        offset = 0
        for job in batch:
            _settle(job, outputs[offset : offset + len(job.items)])
            offset += len(job.items)


def _settle(job: _Job, outcome: list[Any] | BaseException) -> None:
    if job.future.done():
        return
    if isinstance(outcome, BaseException):
        job.future.set_exception(outcome)
    else:
        job.future.set_result(outcome)

"""The gateway's access state: the key ring (config keys + the SQLite store), the limiter and
usage per key and model. Built by the app; the middleware and services read it."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable
from typing import Any

from gateway.auth.keys import ApiKey, KeyRing, config_keys
from gateway.auth.limits import Limiter
from gateway.auth.store import KeyStore, UsageRow

log = logging.getLogger(__name__)

RELOAD_SECONDS = 2.0  # how soon a key created or revoked by another replica is seen


class Usage:
    """Requests and tokens per (key name, model): totals since this process started (exported as
    metrics at scrape time) and what is not yet in the store (`pending_rows`, until a flush has
    written them).
    One dict row per (key, model) updated per request: this runs on every request."""

    def __init__(self) -> None:
        self.totals: dict[tuple[str, str], list[int]] = {}
        self._flushed: dict[tuple[str, str], tuple[int, int, int]] = {}

    def add(self, key: str, model: str, prompt: int, completion: int) -> None:
        row = self.totals.get((key, model))
        if row is None:
            row = self.totals[(key, model)] = [0, 0, 0]
        row[0] += 1
        row[1] += prompt
        row[2] += completion

    def pending_rows(self) -> list[UsageRow]:
        """Counts not yet stored, per (key, model) that has any."""
        rows = []
        for (key, model), (r, p, c) in list(self.totals.items()):
            r0, p0, c0 = self._flushed.get((key, model), (0, 0, 0))
            if r != r0 or p != p0 or c != c0:
                rows.append((key, model, r - r0, p - p0, c - c0))
        return rows

    def mark_flushed(self, rows: list[UsageRow]) -> None:
        """`rows` (from `pending_rows`) are stored: they are no longer pending."""
        for k, m, r, p, c in rows:
            r0, p0, c0 = self._flushed.get((k, m), (0, 0, 0))
            self._flushed[(k, m)] = (r0 + r, p0 + p, c0 + c)


def merge(*sources: Iterable[UsageRow]) -> list[UsageRow]:
    totals: dict[tuple[str, str], list[int]] = {}
    for rows in sources:
        for key, model, r, p, c in rows:
            row = totals.setdefault((key, model), [0, 0, 0])
            row[0] += r
            row[1] += p
            row[2] += c
    return [(k, m, r, p, c) for (k, m), (r, p, c) in sorted(totals.items())]


class Access:
    def __init__(self, api_keys: list[str], store_path: str | None, redis: Any = None) -> None:
        self.config_keys = config_keys(api_keys)
        self.store = KeyStore(store_path) if store_path else None
        self.ring = KeyRing(self.config_keys)
        # Deny by default once any key is configured (a store counts: its keys come and go).
        self.enabled = bool(self.config_keys) or self.store is not None
        self.limiter = Limiter(redis)
        self.usage = Usage()
        self._version = -1
        self._task: asyncio.Task[None] | None = None
        # A flush and a read of the usage exclude each other: rows being written are in neither the
        # store nor `pending` from the read's point of view otherwise (or in both, just after).
        self._usage_lock = asyncio.Lock()

    def account(self, key: ApiKey, model: str | None, prompt: int, completion: int, admission: Any) -> None:
        """A finished request of `key`: its usage row (when it named a model) and its limits'
        reservation settled to the real count (`admission`, when limits charged it). One call per
        request: this runs on every request of a key."""
        if model is not None:
            self.usage.add(key.name, model, prompt, completion)
        if admission is not None:
            self.limiter.settle(admission, prompt + completion)

    async def start(self) -> None:
        if self.store is not None:
            await self.reload()
            self._task = asyncio.create_task(self._keep_fresh())

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
        await self.limiter.close()  # settlements still on their way to Redis
        if self.store is not None:
            await self.flush()
            self.store.close()

    async def reload(self) -> None:
        assert self.store is not None
        stored = await asyncio.to_thread(self.store.all)
        self.ring.replace([*self.config_keys, *stored])

    async def flush(self) -> None:
        """Write the pending usage to the store. Rows count as flushed only once written, so a
        failed write (a locked file) leaves them pending for the next flush instead of losing them."""
        if self.store is None:
            return
        async with self._usage_lock:
            rows = self.usage.pending_rows()
            if rows:
                await asyncio.to_thread(self.store.add_usage, rows)
                self.usage.mark_flushed(rows)

    async def _keep_fresh(self) -> None:
        assert self.store is not None
        while True:
            await asyncio.sleep(RELOAD_SECONDS)
            try:
                version = await asyncio.to_thread(self.store.version)
                if version != self._version:
                    self._version = version
                    await self.reload()
                await self.flush()
            except Exception:  # a locked or lost file must not stop the loop
                log.exception("key store refresh failed")

    async def usage_rows(self) -> list[UsageRow]:
        async with self._usage_lock:
            stored = await asyncio.to_thread(self.store.usage) if self.store is not None else []
            return merge(stored, self.usage.pending_rows())

    def keys(self) -> list[ApiKey]:
        return self.ring.all()

"""Usage per key survives its trip to the key store: a read racing a flush counts every request
once, a failed write keeps its rows for the next flush, and a failed write does not leave the
store's connection stuck inside its transaction."""

from __future__ import annotations

import asyncio
import sqlite3
import threading
from collections.abc import Iterable
from pathlib import Path

import pytest

from gateway.auth.access import Access
from gateway.auth.store import KeyStore


def _requests(rows: list[tuple[str, str, int, int, int]]) -> int:
    return sum(r for _, _, r, _, _ in rows)


def test_a_failed_usage_write_leaves_the_store_usable(tmp_path: Path) -> None:
    store = KeyStore(str(tmp_path / "keys.db"))
    with pytest.raises(sqlite3.ProgrammingError):
        store.add_usage([("alice", "m", 1, 2, 3), ("bob", "m", 1, 2)])  # type: ignore[list-item]
    store.add_usage([("alice", "m", 1, 2, 3)])
    assert store.usage() == [("alice", "m", 1, 2, 3)]  # the failed batch left nothing behind
    store.close()


def test_a_read_racing_a_flush_counts_every_request_once(tmp_path: Path) -> None:
    async def run() -> None:
        access = Access([], str(tmp_path / "keys.db"))
        assert access.store is not None
        writing, release = threading.Event(), threading.Event()
        add_usage = access.store.add_usage

        def slow_add_usage(rows: Iterable[tuple[str, str, int, int, int]]) -> None:
            writing.set()
            release.wait(20)
            add_usage(rows)

        access.store.add_usage = slow_add_usage  # type: ignore[method-assign]
        for _ in range(3):
            access.usage.add("alice", "m", 10, 5)
        flush = asyncio.create_task(access.flush())
        assert await asyncio.to_thread(writing.wait, 20)
        read = asyncio.create_task(access.usage_rows())  # while the rows are on their way to the file
        access.usage.add("alice", "m", 10, 5)
        await asyncio.sleep(0.05)
        release.set()
        await flush
        assert _requests(await read) == 4
        assert _requests(await access.usage_rows()) == 4
        await access.close()

    asyncio.run(run())


def test_rows_of_a_failed_flush_are_written_by_the_next(tmp_path: Path) -> None:
    async def run() -> None:
        access = Access([], str(tmp_path / "keys.db"))
        assert access.store is not None
        add_usage, failures = access.store.add_usage, [sqlite3.OperationalError("database is locked")]

        def flaky_add_usage(rows: Iterable[tuple[str, str, int, int, int]]) -> None:
            if failures:
                raise failures.pop()
            add_usage(rows)

        access.store.add_usage = flaky_add_usage  # type: ignore[method-assign]
        access.usage.add("alice", "m", 10, 5)
        with pytest.raises(sqlite3.OperationalError):
            await access.flush()
        assert await access.usage_rows() == [("alice", "m", 1, 10, 5)]
        await access.flush()
        assert access.store.usage() == [("alice", "m", 1, 10, 5)]
        assert await access.usage_rows() == [("alice", "m", 1, 10, 5)]  # counted once
        await access.close()

    asyncio.run(run())

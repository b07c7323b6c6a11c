"""Streams and awaitables tied to the client: primed streams, disconnect cancelling, fan-out."""

from __future__ import annotations

import asyncio
import weakref
from collections.abc import AsyncIterator, Awaitable
from typing import Any, TypeVar

from gateway.context import RequestContext

T = TypeVar("T")


async def primed(stream: AsyncIterator[Any]) -> AsyncIterator[Any]:
    """Pull the first item now, so that errors before any output become a normal HTTP error.

    Returns an iterator that yields that item and then the rest.
    """
    try:
        first = await anext(stream)
    except StopAsyncIteration:
        first = None
        empty = True
    else:
        empty = False

    async def rest() -> AsyncIterator[Any]:
        try:
            if not empty:
                yield first
                async for item in stream:
                    yield item
        finally:
            aclose = getattr(stream, "aclose", None)
            if aclose is not None:
                await aclose()

    return rest()


# How long a request's work runs before a listener for its client's disconnect is started: at
# least this, at most twice this (one shared timer per event loop ticks every LISTEN_AFTER and
# starts the listeners of the requests that were already running at the tick before). A
# listener is a task per request, and a timer per request cost nearly as much (together ~7%
# of the CPU of an upstream chat request in front of a fast upstream, bench/upstream_cpu.py);
# work that ends sooner never needs either. The server keeps a disconnect, so a listener started
# late still sees it at once.
LISTEN_AFTER = 0.05


class _Watch:
    """One request's work, watched for its client's disconnect."""

    __slots__ = ("handler", "ctx", "listener", "finished")

    def __init__(self, handler: asyncio.Task[Any], ctx: RequestContext) -> None:
        self.handler = handler
        self.ctx = ctx
        self.listener: asyncio.Future[Any] | None = None
        self.finished = False

    def listen(self) -> None:
        if not self.finished:
            self.listener = asyncio.ensure_future(self.ctx.wait_disconnect())
            self.listener.add_done_callback(self._heard)

    def _heard(self, future: asyncio.Future[Any]) -> None:
        if not self.finished and not future.cancelled():
            self.handler.cancel("client disconnected")

    def end(self) -> None:
        self.finished = True
        if self.listener is not None:
            self.listener.cancel()


class _Watcher:
    """The requests of one event loop whose work is running, in two generations: those that
    began since the last tick and those that were running at it. Each tick starts the older
    generation's listeners; the timer runs only while some work is watched."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.young: dict[_Watch, None] = {}
        self.old: dict[_Watch, None] = {}
        self.timer: asyncio.TimerHandle | None = None

    def add(self, watch: _Watch) -> None:
        self.young[watch] = None
        if self.timer is None:
            self.timer = self.loop.call_later(LISTEN_AFTER, self._tick)

    def discard(self, watch: _Watch) -> None:
        if watch in self.young:
            del self.young[watch]
        else:
            self.old.pop(watch, None)

    def _tick(self) -> None:
        for watch in self.old:
            watch.listen()
        self.old, self.young = self.young, {}
        self.timer = self.loop.call_later(LISTEN_AFTER, self._tick) if self.old else None


_watchers: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _Watcher] = weakref.WeakKeyDictionary()


def _watcher() -> _Watcher:
    loop = asyncio.get_running_loop()
    watcher = _watchers.get(loop)
    if watcher is None:
        watcher = _watchers[loop] = _Watcher(loop)
    return watcher


async def until_disconnect(ctx: RequestContext, work: Awaitable[T]) -> T:
    """Run `work`, cancelling it if the client disconnects first.

    Starlette does not cancel a non-streaming handler whose client went away, so
    a long generation would run to the end for nobody. Once the body has been
    read, `ctx.wait_disconnect` (the next ASGI receive()) only returns when the
    client disconnects. The work runs in this task; a listener task is started only once the
    work has run for LISTEN_AFTER to 2 x LISTEN_AFTER seconds (this is on every request's path).
    """
    handler = asyncio.current_task()
    assert handler is not None
    watch = _Watch(handler, ctx)
    watcher = _watcher()
    watcher.add(watch)
    try:
        return await work
    finally:
        watch.end()
        watcher.discard(watch)


async def gather_or_cancel(*work: Awaitable[T]) -> list[T]:
    """All of `work` concurrently; the first failure cancels the rest (asyncio.gather would leave
    them generating for nobody) and is raised as it is."""
    tasks = [asyncio.ensure_future(w) for w in work]
    try:
        return list(await asyncio.gather(*tasks))
    finally:
        for task in tasks:
            task.cancel()  # no-op on the finished ones

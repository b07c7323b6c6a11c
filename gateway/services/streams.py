"""Streams and awaitables tied to the client: primed streams, disconnect cancelling, fan-out."""

from __future__ import annotations

import asyncio
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


# How long a request's work runs before a listener for its client's disconnect is started.
# The listener is a task per request (created, run, cancelled: ~7% of the CPU of an upstream
# chat request in front of a fast upstream, bench/upstream_cpu.py); work that ends sooner never
# needs one, and for longer work a disconnect is noticed at most this much later (the server
# keeps the disconnect, so a listener started late still sees it at once).
LISTEN_AFTER = 0.05


async def until_disconnect(ctx: RequestContext, work: Awaitable[T]) -> T:
    """Run `work`, cancelling it if the client disconnects first.

    Starlette does not cancel a non-streaming handler whose client went away, so
    a long generation would run to the end for nobody. Once the body has been
    read, `ctx.wait_disconnect` (the next ASGI receive()) only returns when the
    client disconnects. The work runs in this task; the listener task is started only once
    the work has taken LISTEN_AFTER seconds (a timer until then: this is on every request's path).
    """
    handler = asyncio.current_task()
    assert handler is not None
    finished = False
    listener: asyncio.Future[Any] | None = None

    def on_disconnect(future: asyncio.Future[Any]) -> None:
        if not finished and not future.cancelled():
            handler.cancel("client disconnected")

    def listen() -> None:
        nonlocal listener
        if not finished:
            listener = asyncio.ensure_future(ctx.wait_disconnect())
            listener.add_done_callback(on_disconnect)

    timer = asyncio.get_running_loop().call_later(LISTEN_AFTER, listen)
    try:
        return await work
    finally:
        finished = True
        timer.cancel()
        if listener is not None:
            listener.cancel()


async def gather_or_cancel(*work: Awaitable[T]) -> list[T]:
    """All of `work` concurrently; the first failure cancels the rest (asyncio.gather would leave
    them generating for nobody) and is raised as it is."""
    tasks = [asyncio.ensure_future(w) for w in work]
    try:
        return list(await asyncio.gather(*tasks))
    finally:
        for task in tasks:
            task.cancel()  # no-op on the finished ones

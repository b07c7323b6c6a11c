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


async def until_disconnect(ctx: RequestContext, work: Awaitable[T]) -> T:
    """Run `work`, cancelling it if the client disconnects first.

    Starlette does not cancel a non-streaming handler whose client went away, so
    a long generation would run to the end for nobody. Once the body has been
    read, `ctx.wait_disconnect` (the next ASGI receive()) only returns when the
    client disconnects. The work runs in this task (one listener task per request,
    not two tasks and a wait: this is on every request's path).
    """
    handler = asyncio.current_task()
    assert handler is not None
    finished = False

    def on_disconnect(listener: asyncio.Future[Any]) -> None:
        if not finished and not listener.cancelled():
            handler.cancel("client disconnected")

    listener = asyncio.ensure_future(ctx.wait_disconnect())
    listener.add_done_callback(on_disconnect)
    try:
        return await work
    finally:
        finished = True
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

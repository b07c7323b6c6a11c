"""Model resolution and metered generation shared by every API family."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable
from typing import Any, TypeVar

from fastapi import Request

from gateway.backends.base import Backend, GenerationEvent, collect
from gateway.backends.registry import Entry
from gateway.domain import GenerationRequest, GenerationResult, StreamEnd, Task
from gateway.errors import ModelNotFound, TaskNotSupported
from gateway.state import AppState

T = TypeVar("T")

# Names clients send when they mean "whatever this endpoint serves": the HF
# client's chat_completion sends "dummy", TGI-style OpenAI examples send "tgi".
PLACEHOLDER_NAMES = frozenset({"tgi", "dummy", "default"})

# Which model tasks can answer a request for a task.
COMPATIBLE_TASKS = {
    Task.FEATURE_EXTRACTION: {Task.FEATURE_EXTRACTION, Task.SENTENCE_SIMILARITY},
}


def resolve_entry(state: AppState, request: Request, name: str, task: Task | None = None) -> Entry:
    registry = state.registry
    try:
        entry = registry.lookup(name)
    except ModelNotFound:
        default = registry.default_for(task) if name in PLACEHOLDER_NAMES else None
        if default is None:
            request.state.model = "unknown"  # metric labels stay bounded: configured names only
            raise
        entry = default
    request.state.model = entry.spec.name
    return entry


def name_model(state: AppState, request: Request, name: object, task: Task | None = None) -> None:
    """Label the request's metrics with the model it names, for a request refused before it is
    resolved (a body that fails validation): its 400 counts under that model, not under "none"."""
    if isinstance(name, str) and name and getattr(request.state, "model", None) is None:
        try:
            resolve_entry(state, request, name, task)
        except ModelNotFound:
            pass


def check_task(entry: Entry, task: Task | None) -> None:
    """Refuse a model whose task (known once loaded, at the latest) cannot answer `task`."""
    if task is not None and entry.task is not None and entry.task not in COMPATIBLE_TASKS.get(task, {task}):
        raise TaskNotSupported(
            f"Model '{entry.spec.name}' serves {entry.task.value}, not {task.value}.", param="model"
        )


async def resolve_backend(
    state: AppState, request: Request, name: str, task: Task | None = None, *, wait: bool = True
) -> tuple[Entry, Backend]:
    entry = resolve_entry(state, request, name, task)
    backend = await state.registry.ensure_loaded(entry, wait=wait)
    check_task(entry, task)
    return entry, backend


async def metered(
    state: AppState, model: str, events: AsyncIterator[GenerationEvent], started: float
) -> AsyncIterator[GenerationEvent]:
    """Pass events through, recording time to first token and token counts."""
    metrics = state.metrics.of_model(model)
    first = True
    async for event in events:
        if first and not isinstance(event, StreamEnd):
            metrics.time_to_first_token.observe(time.perf_counter() - started)
            first = False
        if isinstance(event, StreamEnd):
            metrics.count_tokens(event.usage)
        yield event


def stream_generation(
    state: AppState, entry: Entry, backend: Backend, request: GenerationRequest, received_at: float | None = None
) -> AsyncIterator[GenerationEvent]:
    """The backend's event stream, metered from `received_at` (when the request arrived)."""
    started = time.perf_counter() if received_at is None else received_at
    return metered(state, entry.spec.name, backend.generate_stream(request), started)


async def until_disconnect(request: Request, work: Awaitable[T]) -> T:
    """Run `work`, cancelling it if the client disconnects first.

    Starlette does not cancel a non-streaming handler whose client went away, so
    a long generation would run to the end for nobody. Once the body has been
    read, the next ASGI receive() only returns when the client disconnects. The
    work runs in this task (one listener task per request, not two tasks and a
    wait: this is on every request's path).
    """
    handler = asyncio.current_task()
    assert handler is not None
    finished = False

    def on_disconnect(listener: asyncio.Future[Any]) -> None:
        if not finished and not listener.cancelled():
            handler.cancel("client disconnected")

    listener = asyncio.ensure_future(request.receive())
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


async def run_generation(
    state: AppState, entry: Entry, backend: Backend, request: GenerationRequest, received_at: float | None = None
) -> GenerationResult:
    """A whole result, metered like a stream from `received_at` (when the request arrived)."""
    if type(backend).generate is Backend.generate:
        # the backend's answer is its own stream collected: time its first token there
        return await collect(stream_generation(state, entry, backend, request, received_at), request.sampling.n)
    # A backend with its own whole-answer call (upstream) hands over every token at once.
    started = time.perf_counter() if received_at is None else received_at
    result = await backend.generate(request)
    metrics = state.metrics.of_model(entry.spec.name)
    metrics.time_to_first_token.observe(time.perf_counter() - started)
    metrics.count_tokens(result.usage)
    return result

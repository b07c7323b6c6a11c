"""Generation metered per model: time to first token and token counts."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator

from gateway import tracing
from gateway.backends.base import Backend, Capability, collect, refuse_unserved
from gateway.backends.registry import Entry
from gateway.context import RequestContext
from gateway.domain import GenerationEvent, GenerationRequest, GenerationResult, StreamEnd, TokenDelta, Usage
from gateway.state import AppState


async def metered(
    state: AppState,
    model: str,
    events: AsyncIterator[GenerationEvent],
    started: float,
    ctx: RequestContext | None = None,
) -> AsyncIterator[GenerationEvent]:
    """Pass events through, recording time to first token, the time between tokens and token
    counts (also on `ctx`, for the request's log line and its key's limits)."""
    metrics = state.metrics.of_model(model)
    itl = metrics.inter_token_latency
    last: dict[int, float] = {}  # each choice's previous token (n > 1 interleaves choices)
    async for event in events:
        if isinstance(event, StreamEnd):
            count(state, model, event.usage, ctx)
        elif not (isinstance(event, TokenDelta) and event.echoed):  # an echoed prompt is not an answer
            now = time.perf_counter()
            if not last:
                ttft = now - started
                metrics.time_to_first_token.observe(ttft)
                if ctx is not None and ctx.ttft is None:
                    ctx.ttft = ttft
            previous = last.get(event.index)
            if previous is not None:
                itl.observe(now - previous)
            last[event.index] = now
        yield event


def count(state: AppState, model: str, usage: Usage, ctx: RequestContext | None) -> None:
    state.metrics.of_model(model).count_tokens(usage)
    if ctx is not None:
        ctx.prompt_tokens += usage.prompt_tokens
        ctx.completion_tokens += usage.completion_tokens


def stream_generation(
    state: AppState,
    entry: Entry,
    backend: Backend,
    request: GenerationRequest,
    received_at: float | None = None,
    *,
    ctx: RequestContext | None = None,
) -> AsyncIterator[GenerationEvent]:
    """The backend's event stream, metered from `received_at` (when the request arrived)."""
    refuse_unserved(backend, request)
    started = time.perf_counter() if received_at is None else received_at
    _waited(ctx)
    events = metered(state, entry.spec.name, backend.generate_stream(request), started, ctx)
    return events if not tracing.enabled() else _traced(events, entry.spec.name)


async def _traced(events: AsyncIterator[GenerationEvent], model: str) -> AsyncIterator[GenerationEvent]:
    span = tracing.start("generation", **{"gen_ai.request.model": model})
    try:
        async for event in events:
            yield event
    finally:
        tracing.end(span)


def _waited(ctx: RequestContext | None) -> None:
    """The request's wait before its backend was called (model loading, limits), for its log
    line and trace; a local engine's own batch-slot wait is gateway_queue_time_seconds."""
    if ctx is not None and ctx.queue_time is None:
        ctx.queue_time = time.perf_counter() - ctx.received_at
        if tracing.enabled():
            tracing.end(tracing.start("queue", **{"gateway.queue_ms": ctx.queue_time * 1000}))


async def run_generation(
    state: AppState,
    entry: Entry,
    backend: Backend,
    request: GenerationRequest,
    received_at: float | None = None,
    *,
    ctx: RequestContext | None = None,
) -> GenerationResult:
    """A whole result, metered like a stream from `received_at` (when the request arrived)."""
    refuse_unserved(backend, request)
    if Capability.WHOLE_RESPONSE not in backend.capabilities:
        # the backend's answer is its own stream collected: time its first token there
        events = stream_generation(state, entry, backend, request, received_at, ctx=ctx)
        return await collect(events, request.sampling.n)
    # A backend with its own whole-answer call (upstream) hands over every token at once.
    started = time.perf_counter() if received_at is None else received_at
    _waited(ctx)
    with tracing.span("generation", **{"gen_ai.request.model": entry.spec.name}):
        result = await backend.generate(request)
    ttft = time.perf_counter() - started
    state.metrics.of_model(entry.spec.name).time_to_first_token.observe(ttft)
    if ctx is not None and ctx.ttft is None:
        ctx.ttft = ttft
    count(state, entry.spec.name, result.usage, ctx)
    return result

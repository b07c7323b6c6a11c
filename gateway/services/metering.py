"""Generation metered per model: time to first token and token counts."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator

from gateway.backends.base import Backend, Capability, collect, refuse_unserved
from gateway.backends.registry import Entry
from gateway.domain import GenerationEvent, GenerationRequest, GenerationResult, StreamEnd
from gateway.state import AppState


async def metered(
    state: AppState, model: str, events: AsyncIterator[GenerationEvent], started: float
) -> AsyncIterator[GenerationEvent]:
    """Pass events through, recording time to first token, the time between tokens and token counts."""
    metrics = state.metrics.of_model(model)
    itl = metrics.inter_token_latency
    last: dict[int, float] = {}  # each choice's previous token (n > 1 interleaves choices)
    async for event in events:
        if isinstance(event, StreamEnd):
            metrics.count_tokens(event.usage)
        elif not event.echoed:  # an echoed prompt is not an answer
            now = time.perf_counter()
            if not last:
                metrics.time_to_first_token.observe(now - started)
            previous = last.get(event.index)
            if previous is not None:
                itl.observe(now - previous)
            last[event.index] = now
        yield event


def stream_generation(
    state: AppState, entry: Entry, backend: Backend, request: GenerationRequest, received_at: float | None = None
) -> AsyncIterator[GenerationEvent]:
    """The backend's event stream, metered from `received_at` (when the request arrived)."""
    refuse_unserved(backend, request)
    started = time.perf_counter() if received_at is None else received_at
    return metered(state, entry.spec.name, backend.generate_stream(request), started)


async def run_generation(
    state: AppState, entry: Entry, backend: Backend, request: GenerationRequest, received_at: float | None = None
) -> GenerationResult:
    """A whole result, metered like a stream from `received_at` (when the request arrived)."""
    refuse_unserved(backend, request)
    if Capability.WHOLE_RESPONSE not in backend.capabilities:
        # the backend's answer is its own stream collected: time its first token there
        return await collect(stream_generation(state, entry, backend, request, received_at), request.sampling.n)
    # A backend with its own whole-answer call (upstream) hands over every token at once.
    started = time.perf_counter() if received_at is None else received_at
    result = await backend.generate(request)
    metrics = state.metrics.of_model(entry.spec.name)
    metrics.time_to_first_token.observe(time.perf_counter() - started)
    metrics.count_tokens(result.usage)
    return result

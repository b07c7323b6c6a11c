"""Generation metered per model: time to first token and token counts."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator

from gateway.backends.base import Backend, Capability, collect, refuse_unserved
from gateway.backends.registry import Entry
from gateway.domain import GenerationEvent, GenerationRequest, GenerationResult, StreamEnd, TokenDelta
from gateway.state import AppState


async def metered(
    state: AppState, model: str, events: AsyncIterator[GenerationEvent], started: float
) -> AsyncIterator[GenerationEvent]:
    """Pass events through, recording time to first token and token counts."""
    metrics = state.metrics.of_model(model)
    first = True
    async for event in events:
        if first and isinstance(event, TokenDelta) and not event.echoed:  # an echoed prompt is not an answer yet
            metrics.time_to_first_token.observe(time.perf_counter() - started)
            first = False
        if isinstance(event, StreamEnd):
            metrics.count_tokens(event.usage)
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

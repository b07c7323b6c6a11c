"""The legacy completions flow (OpenAI /v1/completions): several prompts answered as one response.

Choices are numbered across prompts (prompt p's choice i is p * n + i) and the usage is the
sum over prompts, as OpenAI answers.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import replace

from gateway.backends.base import Backend
from gateway.backends.registry import Entry
from gateway.context import RequestContext
from gateway.domain import GenerationEvent, GenerationRequest, GenerationResult, StreamEnd, Task, Usage
from gateway.services.metering import run_generation, stream_generation
from gateway.services.resolve import cost_of, resolve
from gateway.services.streams import gather_or_cancel, primed, until_disconnect
from gateway.state import AppState

TASK = Task.TEXT_GENERATION


async def complete(
    state: AppState, ctx: RequestContext, name: str, requests: list[GenerationRequest]
) -> list[GenerationResult]:
    """One result per prompt, generated concurrently; the first failure cancels the rest, and
    a client that disconnects cancels them all."""
    entry, backend = await resolve(state, ctx, name, TASK, cost=cost_of(requests[0], len(requests)))
    work = gather_or_cancel(*(run_generation(state, entry, backend, r, ctx.received_at, ctx=ctx) for r in requests))
    return await until_disconnect(ctx, work)


async def stream(
    state: AppState, ctx: RequestContext, name: str, requests: list[GenerationRequest]
) -> AsyncIterator[GenerationEvent]:
    """The prompts' events one prompt after the other, choice indexes continuing across prompts,
    closed by one StreamEnd with the summed usage. Primed on the first prompt."""
    entry, backend = await resolve(state, ctx, name, TASK, cost=cost_of(requests[0], len(requests)))
    first = await primed(stream_generation(state, entry, backend, requests[0], ctx.received_at, ctx=ctx))
    return _one_after_another(state, ctx, entry, backend, requests, first)


async def _one_after_another(
    state: AppState,
    ctx: RequestContext,
    entry: Entry,
    backend: Backend,
    requests: list[GenerationRequest],
    first: AsyncIterator[GenerationEvent],
) -> AsyncIterator[GenerationEvent]:
    total = Usage()
    for number, request in enumerate(requests):
        events = first if number == 0 else stream_generation(state, entry, backend, request, ctx=ctx)
        offset = number * request.sampling.n
        async for event in events:
            if isinstance(event, StreamEnd):
                total.add(event.usage)
            else:
                yield replace(event, index=event.index + offset) if offset else event
    yield StreamEnd(total)

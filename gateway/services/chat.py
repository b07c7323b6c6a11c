"""The chat flow (OpenAI chat completions): resolve the text-generation model, generate, meter.

Also serves the chat API under a model URL (/models/{id}/v1/chat/completions), where the URL
names the model: `model_named` resolves it first, as the hosted Inference API does.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

from gateway.context import RequestContext
from gateway.domain import GenerationEvent, GenerationRequest, GenerationResult, Task
from gateway.services.metering import run_generation, stream_generation
from gateway.services.resolve import cost_of, resolve, resolve_entry
from gateway.services.streams import primed, until_disconnect
from gateway.state import AppState

TASK = Task.TEXT_GENERATION


def model_named(state: AppState, ctx: RequestContext, model_id: str) -> str:
    """The configured name of the model a URL names (exact names and aliases, no placeholders)."""
    return resolve_entry(state, ctx, model_id, placeholders=False).spec.name


async def complete(state: AppState, ctx: RequestContext, name: str, request: GenerationRequest) -> GenerationResult:
    """The whole answer; generation stops if the client disconnects first."""
    entry, backend = await resolve(state, ctx, name, TASK, cost=cost_of(request))
    return await until_disconnect(ctx, run_generation(state, entry, backend, request, ctx.received_at, ctx=ctx))


async def stream(
    state: AppState, ctx: RequestContext, name: str, request: GenerationRequest
) -> AsyncIterator[GenerationEvent]:
    """The answer's events, primed: a failure before the first event is raised here, not in-band."""
    entry, backend = await resolve(state, ctx, name, TASK, cost=cost_of(request))
    events: AsyncIterator[GenerationEvent] = await primed(
        stream_generation(state, entry, backend, request, ctx.received_at, ctx=ctx)
    )
    return events

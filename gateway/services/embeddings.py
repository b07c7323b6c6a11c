"""The embeddings flow (OpenAI /v1/embeddings): resolve a feature-extraction model, embed, count tokens."""

from __future__ import annotations

from gateway.backends.base import Capability
from gateway.context import RequestContext
from gateway.domain import EmbeddingRequest, EmbeddingResult, Task
from gateway.errors import TaskNotSupported
from gateway.services.metering import count
from gateway.services.resolve import resolve
from gateway.state import AppState


async def embed(state: AppState, ctx: RequestContext, name: str, request: EmbeddingRequest) -> EmbeddingResult:
    entry, backend = await resolve(state, ctx, name, Task.FEATURE_EXTRACTION)
    if Capability.EMBED not in backend.capabilities:  # e.g. an upstream whose API has no embeddings
        raise TaskNotSupported(f"Model '{backend.name}' does not compute embeddings.")
    result = await backend.embed(request)
    count(state, entry.spec.name, result.usage, ctx)
    return result

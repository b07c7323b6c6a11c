"""The embeddings flow (OpenAI /v1/embeddings): resolve a feature-extraction model, embed, count tokens."""

from __future__ import annotations

from gateway.context import RequestContext
from gateway.domain import EmbeddingRequest, EmbeddingResult, Task
from gateway.services.resolve import resolve
from gateway.state import AppState


async def embed(state: AppState, ctx: RequestContext, name: str, request: EmbeddingRequest) -> EmbeddingResult:
    entry, backend = await resolve(state, ctx, name, Task.FEATURE_EXTRACTION)
    result = await backend.embed(request)
    state.metrics.of_model(entry.spec.name).count_tokens(result.usage)
    return result

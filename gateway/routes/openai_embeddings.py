"""POST /v1/embeddings."""

from __future__ import annotations

from fastapi import APIRouter, Request

from gateway.domain import Task
from gateway.protocol.openai import EmbeddingsRequest, encode_embedding
from gateway.routes.common.body import RawRequestRoute, openapi_body, parse_body
from gateway.routes.common.deps import context
from gateway.routes.common.responses import FastJSONResponse, ignored_header
from gateway.services.resolve import name_model, resolve
from gateway.state import AppState

router = APIRouter(tags=["openai"])


async def create_embeddings(request: Request) -> FastJSONResponse:
    # The body is parsed by pydantic directly (routes/common/body.py): at hundreds of batched embedding
    # requests a second the event loop, not the model, is what limits throughput.
    body = await parse_body(request, EmbeddingsRequest, Task.FEATURE_EXTRACTION)
    state: AppState = request.app.state.gateway
    ctx = context(request)
    name_model(state, ctx, body.model, Task.FEATURE_EXTRACTION)  # a refused body counts under its model
    ignored = body.ignored_fields()
    entry, backend = await resolve(state, ctx, body.model, Task.FEATURE_EXTRACTION)
    result = await backend.embed(body.to_domain())
    state.metrics.of_model(entry.spec.name).count_tokens(result.usage)
    data = [
        {"object": "embedding", "index": i, "embedding": encode_embedding(vector, body.encoding_format)}
        for i, vector in enumerate(result.vectors)
    ]
    usage = {"prompt_tokens": result.usage.prompt_tokens, "total_tokens": result.usage.prompt_tokens}
    return FastJSONResponse(
        {"object": "list", "model": body.model, "data": data, "usage": usage}, headers=ignored_header(ignored)
    )


router.add_api_route(
    "/v1/embeddings",
    create_embeddings,
    methods=["POST"],
    response_model=None,
    route_class_override=RawRequestRoute,
    openapi_extra=openapi_body(EmbeddingsRequest),
)

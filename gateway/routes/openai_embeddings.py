"""POST /v1/embeddings."""

from __future__ import annotations

from fastapi import APIRouter, Request

from gateway.domain import Task
from gateway.protocol import openai_responses as wire
from gateway.protocol.openai import EmbeddingsRequest
from gateway.routes.common.body import openapi_body, parse_body
from gateway.routes.common.deps import context
from gateway.routes.common.families import OpenAIRoute
from gateway.routes.common.responses import FastJSONResponse, ignored_header
from gateway.services import embeddings
from gateway.services.resolve import name_model
from gateway.state import AppState

router = APIRouter(tags=["openai"], route_class=OpenAIRoute)


async def create_embeddings(request: Request) -> FastJSONResponse:
    # The body is parsed by pydantic directly (routes/common/body.py): at hundreds of batched embedding
    # requests a second the event loop, not the model, is what limits throughput.
    body = await parse_body(request, EmbeddingsRequest, Task.FEATURE_EXTRACTION)
    state: AppState = request.app.state.gateway
    ctx = context(request)
    ctx.keep_alive = body.keep_alive
    name_model(state, ctx, body.model, Task.FEATURE_EXTRACTION)  # a refused body counts under its model
    headers = ignored_header(body.ignored_fields())
    result = await embeddings.embed(state, ctx, body.model, body.to_domain())
    return FastJSONResponse(
        wire.embeddings(result, model=body.model, encoding_format=body.encoding_format), headers=headers
    )


router.add_api_route(
    "/v1/embeddings",
    create_embeddings,
    methods=["POST"],
    response_model=None,
    openapi_extra=openapi_body(EmbeddingsRequest),
)

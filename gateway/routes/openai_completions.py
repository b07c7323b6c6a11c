"""POST /v1/completions (the legacy text completion API)."""

from __future__ import annotations

import time

from fastapi import APIRouter, Request
from starlette.responses import Response

from gateway.domain import Task
from gateway.ids import unique_hex
from gateway.protocol import openai_responses as wire
from gateway.protocol.openai import CompletionRequest
from gateway.routes.common.body import openapi_body, parse_body
from gateway.routes.common.deps import context
from gateway.routes.common.families import OpenAIRoute
from gateway.routes.common.responses import FastJSONResponse, ignored_header
from gateway.routes.common.sse import sse_response
from gateway.services import completions
from gateway.services.resolve import name_model
from gateway.state import AppState

router = APIRouter(tags=["openai"], route_class=OpenAIRoute)


async def create_completion(request: Request) -> Response:
    body = await parse_body(request, CompletionRequest, Task.TEXT_GENERATION)
    state: AppState = request.app.state.gateway
    ctx = context(request)
    ctx.keep_alive = body.keep_alive
    name_model(state, ctx, body.model, Task.TEXT_GENERATION)  # a refused body counts under its model
    headers = ignored_header(body.ignored_fields())
    generations = body.to_domain(ctx.request_id)
    id, created, model = f"cmpl-{unique_hex()}", int(time.time()), body.model
    scores = body.logprobs is not None
    if not body.stream:
        results = await completions.complete(state, ctx, model, generations)
        answer = wire.completion(results, id=id, model=model, created=created, logprobs=scores)
        return FastJSONResponse(answer, headers=headers)
    events = await completions.stream(state, ctx, model, generations)
    chunks = wire.completion_chunks(
        events, id=id, model=model, created=created, include_usage=body.include_usage, logprobs=scores
    )
    ping = state.settings.server.sse_ping_seconds
    return sse_response(chunks, error_event=wire.stream_error_body, ping_seconds=ping, headers=headers)


router.add_api_route(
    "/v1/completions",
    create_completion,
    methods=["POST"],
    response_model=None,
    openapi_extra=openapi_body(CompletionRequest),
)

"""POST /v1/chat/completions, and the same API under a model URL (/models/{id}/v1/chat/completions)."""

from __future__ import annotations

import time

from fastapi import APIRouter, Request
from starlette.responses import Response

from gateway.domain import Task
from gateway.ids import unique_hex
from gateway.protocol import openai_responses as wire
from gateway.protocol.openai import ChatCompletionRequest
from gateway.routes.common.body import openapi_body, parse_body
from gateway.routes.common.deps import context
from gateway.routes.common.families import OpenAIBodyRoute, OpenAIRoute
from gateway.routes.common.responses import FastJSONResponse, ignored_header
from gateway.routes.common.sse import sse_response
from gateway.services import chat
from gateway.services.resolve import name_model
from gateway.state import AppState

router = APIRouter(tags=["openai"], route_class=OpenAIRoute)


async def create_chat_completion(request: Request) -> Response:
    body = await parse_body(request, ChatCompletionRequest, Task.TEXT_GENERATION)
    return await _answer(request, body)


async def model_chat(model_id: str, request: Request) -> Response:
    """The URL names the model, whatever the body says (an unknown one is a 404 before the body is read)."""
    name = chat.model_named(request.app.state.gateway, context(request), model_id)
    body = await parse_body(request, ChatCompletionRequest)
    return await _answer(request, body.model_copy(update={"model": name}))


async def _answer(request: Request, body: ChatCompletionRequest) -> Response:
    state: AppState = request.app.state.gateway
    ctx = context(request)
    ctx.keep_alive = body.keep_alive
    name_model(state, ctx, body.model, Task.TEXT_GENERATION)  # a refused body counts under its model
    headers = ignored_header(body.ignored_fields())
    generation = body.to_domain(ctx.request_id)
    id, created, model = f"chatcmpl-{unique_hex()}", int(time.time()), body.model
    scores = bool(body.logprobs)
    if not body.stream:
        result = await chat.complete(state, ctx, model, generation)
        answer = wire.chat_completion(result, id=id, model=model, created=created, logprobs=scores)
        return FastJSONResponse(answer, headers=headers)
    events = await chat.stream(state, ctx, model, generation)
    chunks = wire.chat_chunks(
        events, id=id, model=model, created=created, include_usage=body.include_usage, logprobs=scores
    )
    ping = state.settings.server.sse_ping_seconds
    return sse_response(chunks, error_event=wire.stream_error_body, ping_seconds=ping, headers=headers)


router.add_api_route(
    "/v1/chat/completions",
    create_chat_completion,
    methods=["POST"],
    response_model=None,
    openapi_extra=openapi_body(ChatCompletionRequest),
)
# Ahead of hf_tasks' `/models/{model_id:path}` (app.py puts the OpenAI routes first), which would swallow it.
router.add_api_route(
    "/models/{model_id:path}/v1/chat/completions",
    model_chat,
    methods=["POST"],
    response_model=None,
    route_class_override=OpenAIBodyRoute,
    openapi_extra=openapi_body(ChatCompletionRequest),
)

"""POST /v1/chat/completions."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, Request
from starlette.responses import Response

from gateway.backends.base import GenerationEvent
from gateway.domain import StreamEnd, Task
from gateway.ids import unique_hex
from gateway.protocol import openai_responses as wire
from gateway.protocol.openai import ChatCompletionRequest
from gateway.routes.common.body import RawRequestRoute, openapi_body, parse_body
from gateway.routes.common.deps import context
from gateway.routes.common.responses import FastJSONResponse, ignored_header
from gateway.routes.common.sse import sse_response
from gateway.services.metering import run_generation, stream_generation
from gateway.services.resolve import name_model, resolve
from gateway.services.streams import primed, until_disconnect
from gateway.state import AppState

router = APIRouter(tags=["openai"])


async def chat_chunks(
    events: AsyncIterator[GenerationEvent], *, id: str, model: str, created: int, include_usage: bool
) -> AsyncIterator[dict[str, Any]]:
    started: set[int] = set()
    async for event in events:
        if isinstance(event, StreamEnd):
            if include_usage:
                yield wire.chat_chunk(id=id, model=model, created=created, choices=[], usage=event.usage)
            continue
        if not event.text and event.finish_reason is None and event.index in started:
            continue  # nothing to say yet (held-back or partial character)
        choice = wire.chat_delta_choice(event, first=event.index not in started)
        started.add(event.index)
        yield wire.chat_chunk(id=id, model=model, created=created, choices=[choice])


async def create_chat_completion(request: Request) -> Response:
    body = await parse_body(request, ChatCompletionRequest, Task.TEXT_GENERATION)
    return await serve_chat(body, request, request.app.state.gateway)


async def serve_chat(body: ChatCompletionRequest, request: Request, state: AppState) -> Response:
    """A parsed chat request, answered as JSON or as an SSE stream."""
    ctx = context(request)
    name_model(state, ctx, body.model, Task.TEXT_GENERATION)  # a refused body counts under its model
    ignored = body.ignored_fields()
    entry, backend = await resolve(state, ctx, body.model, Task.TEXT_GENERATION)
    generation = body.to_domain(ctx.request_id)
    id, created, model = f"chatcmpl-{unique_hex()}", int(time.time()), body.model
    if not body.stream:
        result = await until_disconnect(
            ctx, run_generation(state, entry, backend, generation, ctx.received_at)
        )
        return FastJSONResponse(
            wire.chat_completion(result, id=id, model=model, created=created), headers=ignored_header(ignored)
        )
    events = await primed(stream_generation(state, entry, backend, generation, ctx.received_at))
    chunks = chat_chunks(events, id=id, model=model, created=created, include_usage=body.include_usage)
    return sse_response(
        chunks,
        error_event=wire.stream_error_body,
        ping_seconds=state.settings.server.sse_ping_seconds,
        headers=ignored_header(ignored),
    )


router.add_api_route(
    "/v1/chat/completions",
    create_chat_completion,
    methods=["POST"],
    response_model=None,
    route_class_override=RawRequestRoute,
    openapi_extra=openapi_body(ChatCompletionRequest),
)

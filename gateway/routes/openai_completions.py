"""POST /v1/completions (the legacy text completion API)."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from dataclasses import replace
from typing import Any

from fastapi import APIRouter, Request
from starlette.responses import Response

from gateway.domain import StreamEnd, Task, Usage
from gateway.ids import unique_hex
from gateway.protocol import openai_responses as wire
from gateway.protocol.openai import CompletionRequest
from gateway.routes.common.body import RawRequestRoute, openapi_body, parse_body
from gateway.routes.common.deps import context
from gateway.routes.common.responses import FastJSONResponse, ignored_header
from gateway.routes.common.sse import sse_response
from gateway.services.metering import run_generation, stream_generation
from gateway.services.resolve import name_model, resolve
from gateway.services.streams import gather_or_cancel, primed, until_disconnect
from gateway.state import AppState

router = APIRouter(tags=["openai"])


async def create_completion(request: Request) -> Response:
    body = await parse_body(request, CompletionRequest, Task.TEXT_GENERATION)
    state: AppState = request.app.state.gateway
    ctx = context(request)
    name_model(state, ctx, body.model, Task.TEXT_GENERATION)  # a refused body counts under its model
    ignored = body.ignored_fields()
    entry, backend = await resolve(state, ctx, body.model, Task.TEXT_GENERATION)
    generations = body.to_domain(ctx.request_id)
    id, created, model = f"cmpl-{unique_hex()}", int(time.time()), body.model
    if not body.stream:
        received_at = ctx.received_at
        work = gather_or_cancel(*(run_generation(state, entry, backend, g, received_at) for g in generations))
        results = await until_disconnect(ctx, work)
        return FastJSONResponse(
            wire.completion(list(results), id=id, model=model, created=created), headers=ignored_header(ignored)
        )

    # Prompts stream one after the other; choice indexes continue across prompts.
    first = await primed(stream_generation(state, entry, backend, generations[0], ctx.received_at))

    async def chunks() -> AsyncIterator[dict[str, Any]]:
        total = Usage()
        for number, generation in enumerate(generations):
            events = first if number == 0 else stream_generation(state, entry, backend, generation)
            offset = number * body.n
            async for event in events:
                if isinstance(event, StreamEnd):
                    total.add(event.usage)
                elif event.text or event.finish_reason is not None:
                    delta = replace(event, index=event.index + offset)
                    yield wire.completion_chunk(id=id, model=model, created=created, delta=delta)
        if body.include_usage:
            yield wire.completion_chunk(id=id, model=model, created=created, delta=None, usage=total)

    return sse_response(
        chunks(),
        error_event=wire.stream_error_body,
        ping_seconds=state.settings.server.sse_ping_seconds,
        headers=ignored_header(ignored),
    )


router.add_api_route(
    "/v1/completions",
    create_completion,
    methods=["POST"],
    response_model=None,
    route_class_override=RawRequestRoute,
    openapi_extra=openapi_body(CompletionRequest),
)

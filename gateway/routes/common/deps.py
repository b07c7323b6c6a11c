"""FastAPI dependencies and the request's context: what routes hand to the services."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from gateway.context import RequestContext
from gateway.state import AppState


async def get_state(request: Request) -> AppState:
    # async on purpose: FastAPI runs a plain `def` dependency in a worker thread, a thread
    # hop per request that measurably slowed the upstream hot path (bench/upstream_overhead.py).
    return request.app.state.gateway


StateDep = Annotated[AppState, Depends(get_state)]


def context(request: Request) -> RequestContext:
    """The request's context, made once per request from what the middleware put in its state
    (id, arrival time) and kept there (scope["state"]["context"], read for the metrics label).
    Read from the scope's dict itself: `request.state` wraps it in an object whose missing
    attributes raise, a cost on every request of the hot routes."""
    state = request.scope["state"]
    ctx: RequestContext | None = state.get("context")
    if ctx is None:
        key = state["key"]
        ctx = state["context"] = RequestContext(
            request_id=state["request_id"],
            received_at=state["received_at"],
            wait_disconnect=request.receive,
            identity=None if key is None else key.name,
            key=key,
        )
    return ctx

"""Map the error hierarchy to each API family's envelope.

The family is the route's (`scope["route"].family`, set by the route classes in
routes/common/families.py). OpenAI routes answer `{"error": {"message", "type", "param",
"code"}}`; Hugging Face and TGI routes `{"error": "...", "error_type": "..."}`, with 422 for
invalid input. Errors raised before routing (auth, body cap, in the middleware) find their
route by matching the app's routes once. Bodies are always JSON objects.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import orjson
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import JSONResponse
from starlette.routing import BaseRoute, Match
from starlette.types import Scope

from gateway.errors import GatewayError, InvalidRequest
from gateway.protocol.hf import error_body as hf_error_body
from gateway.protocol.openai_responses import error_body, stream_error_body
from gateway.routes.common.families import DEFAULT_FAMILY, Family, unrouted_family
from gateway.validation import format_errors

log = logging.getLogger(__name__)


def _openai(exc: GatewayError) -> tuple[dict[str, Any], int]:
    return error_body(exc), exc.status_code


def _hf(exc: GatewayError) -> tuple[dict[str, Any], int]:
    # TGI answers validation errors with 422; the HF client maps the body either way. Size
    # refusals keep their own status (413 body, 431 headers), which proxies and clients know.
    invalid = isinstance(exc, InvalidRequest) and exc.status_code == 400
    return hf_error_body(exc), 422 if invalid else exc.status_code


RENDERERS: dict[Family, Callable[[GatewayError], tuple[dict[str, Any], int]]] = {
    Family.OPENAI: _openai,
    Family.HF: _hf,
}


def matching_route(scope: Scope) -> BaseRoute | None:
    """The route the router would pick (a full match, else the first partial one: a 405)."""
    app = scope.get("app")
    partial = None
    for route in app.router.routes if app is not None else ():
        match, _ = route.matches(scope)
        if match is Match.FULL:
            return route
        if match is Match.PARTIAL and partial is None:
            partial = route
    return partial


def family_of(scope: Scope) -> Family:
    """The API family whose envelope an error on this request takes."""
    route = scope.get("route") or matching_route(scope)
    if route is None:
        return unrouted_family(scope["path"])
    family: Family = getattr(route, "family", DEFAULT_FAMILY)
    return family


def error_response(exc: GatewayError, scope: Scope) -> JSONResponse:
    """The error in the request's API family; the middleware adds x-request-id."""
    body, status = RENDERERS[family_of(scope)](exc)
    return JSONResponse(body, status_code=status, headers=exc.headers)


def stream_ending(exc: GatewayError, scope: Scope) -> bytes:
    """The SSE events that end a stream cut short (drain): the family's in-band error, then
    `[DONE]` where the family's streams end with it (OpenAI's; TGI's end without one)."""
    if family_of(scope) is Family.OPENAI:
        return b"data: " + orjson.dumps(stream_error_body(exc)) + b"\n\ndata: [DONE]\n\n"
    return b"data: " + orjson.dumps(hf_error_body(exc)) + b"\n\n"


def _validation_message(exc: RequestValidationError) -> tuple[str, str | None]:
    errors = exc.errors()
    if not errors:
        return "Invalid request.", None
    first = format_errors(errors[:1], root=None, unknown_msg=None, skip=("body",), strip_value_error=False)[0]
    where = f" at '{first.param}'" if first.param else ""
    return f"Invalid request{where}: {first.message}.", first.param


def install_error_handlers(app: FastAPI) -> None:
    async def on_gateway_error(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, GatewayError)
        if exc.status_code >= 500:
            log.warning("%s on %s: %s", type(exc).__name__, request.url.path, exc.message)
        return error_response(exc, request.scope)

    async def on_validation_error(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, RequestValidationError)
        message, param = _validation_message(exc)
        return error_response(InvalidRequest(message, param=param), request.scope)

    async def on_http_error(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, StarletteHTTPException)
        err = GatewayError(str(exc.detail), code=None)
        err.status_code = exc.status_code
        err.openai_type = "invalid_request_error" if exc.status_code < 500 else "server_error"
        err.hf_error_type = "not_found" if exc.status_code == 404 else "validation"
        return error_response(err, request.scope)

    app.add_exception_handler(GatewayError, on_gateway_error)
    app.add_exception_handler(RequestValidationError, on_validation_error)
    app.add_exception_handler(StarletteHTTPException, on_http_error)
    # Unexpected exceptions are answered by GatewayMiddleware, which keeps the connection usable.

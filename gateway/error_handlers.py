"""Map the error hierarchy to each API family's envelope.

OpenAI routes (`/v1/...`, also under `/models/{id}/v1/...`) answer
`{"error": {"message", "type", "param", "code"}}`; every other route speaks the
Hugging Face dialect, `{"error": "...", "error_type": "..."}`. Bodies are
always JSON objects.
"""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import JSONResponse

from gateway.errors import GatewayError, InvalidRequest
from gateway.protocol.hf import error_body as hf_error_body
from gateway.protocol.openai_responses import error_body
from gateway.validation import format_errors

log = logging.getLogger(__name__)


def is_openai_path(path: str) -> bool:
    return path.startswith("/v1/") or "/v1/" in path


def error_response(exc: GatewayError, path: str) -> JSONResponse:
    """The error in `path`'s API family; the middleware adds x-request-id."""
    if is_openai_path(path):
        body, status = error_body(exc), exc.status_code
    else:
        body = hf_error_body(exc)
        # TGI answers validation errors with 422; the HF client maps the body either way.
        status = 422 if isinstance(exc, InvalidRequest) else exc.status_code
    return JSONResponse(body, status_code=status, headers=exc.headers)


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
        return error_response(exc, request.url.path)

    async def on_validation_error(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, RequestValidationError)
        message, param = _validation_message(exc)
        return error_response(InvalidRequest(message, param=param), request.url.path)

    async def on_http_error(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, StarletteHTTPException)
        err = GatewayError(str(exc.detail), code=None)
        err.status_code = exc.status_code
        err.openai_type = "invalid_request_error" if exc.status_code < 500 else "server_error"
        err.hf_error_type = "not_found" if exc.status_code == 404 else "validation"
        return error_response(err, request.url.path)

    app.add_exception_handler(GatewayError, on_gateway_error)
    app.add_exception_handler(RequestValidationError, on_validation_error)
    app.add_exception_handler(StarletteHTTPException, on_http_error)
    # Unexpected exceptions are answered by GatewayMiddleware, which keeps the connection usable.

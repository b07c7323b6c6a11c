"""Request bodies parsed by pydantic's own JSON parser instead of FastAPI's body dependency.

On the hot routes this halves the per-request parsing cost (one Rust pass from bytes
to a validated model, no stdlib `json` and no dependency solving), measured with
bench/upstream_overhead.py. Errors take the same path as FastAPI's: a
RequestValidationError, which the error handlers turn into the API's 400.
"""

from __future__ import annotations

from typing import Any, TypeVar

import orjson
from fastapi import Request
from fastapi.exceptions import RequestValidationError
from fastapi.routing import APIRoute
from pydantic import BaseModel, ValidationError
from starlette.routing import request_response

from gateway.domain import Task
from gateway.routes.common.deps import context
from gateway.services.input_limits import check_counts, check_depth
from gateway.services.resolve import name_model

M = TypeVar("M", bound=BaseModel)


async def parse_body(request: Request, model: type[M], task: Task | None = None) -> M:
    """The body as `model`; one that fails validation still labels the request's metrics with the
    model it names (the `model` field, resolved like a valid request's, for `task`)."""
    raw = await read_json_body(request)
    try:
        body = model.model_validate_json(raw)
    except ValidationError as exc:
        _name_model_of(request, raw, task)
        errors = exc.errors(include_url=False)
        for error in errors:
            if error.get("type") == "json_invalid":
                error["msg"] = "the body is not valid JSON"
                error["loc"] = ()
        raise RequestValidationError(errors) from None
    fields = _declared(type(body))  # declared fields only: an unknown `n` is the schema's to refuse
    check_counts(
        request.app.state.gateway.settings.server,
        messages=body.messages if "messages" in fields else None,  # type: ignore[attr-defined]
        n=body.n if "n" in fields else None,  # type: ignore[attr-defined]
        stop=body.stop if "stop" in fields else None,  # type: ignore[attr-defined]
        logit_bias=(body.model_extra or {}).get("logit_bias"),
    )
    return body


_DECLARED: dict[type[BaseModel], frozenset[str]] = {}


def _declared(model: type[BaseModel]) -> frozenset[str]:
    """The model's declared field names (pydantic rebuilds `model_fields` on every access)."""
    names = _DECLARED.get(model)
    if names is None:
        names = _DECLARED[model] = frozenset(model.model_fields)
    return names


async def read_json_body(request: Request) -> bytes:
    """The raw body, refused when its JSON nests deeper than server.max_json_depth."""
    raw = await request.body()
    check_depth(request.app.state.gateway.settings.server, raw)
    return raw


def _name_model_of(request: Request, raw: bytes, task: Task | None) -> None:
    try:
        data = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return
    if isinstance(data, dict):
        name_model(request.app.state.gateway, context(request), data.get("model"), task)


class RawRequestRoute(APIRoute):
    """A route whose endpoint takes only the Request and reads its own body with parse_body.

    FastAPI's handler solves dependencies and validates parameters on every request; these
    endpoints have neither, so that machinery was pure cost on the hot path (about a tenth of the
    gateway's CPU time per upstream request, docs/benchmarks-upstream.md). Errors still reach the
    app's exception handlers, and the route keeps its place in the OpenAPI document.
    """

    def __init__(self, path: str, endpoint: Any, **kwargs: Any) -> None:
        super().__init__(path, endpoint, **kwargs)
        self.app = request_response(endpoint)


def _inline(node: Any, defs: dict[str, Any]) -> Any:
    if isinstance(node, dict):
        ref = node.get("$ref")
        if isinstance(ref, str) and ref.startswith("#/$defs/"):
            return _inline(defs[ref.removeprefix("#/$defs/")], defs)
        return {k: _inline(v, defs) for k, v in node.items() if k != "$defs"}
    if isinstance(node, list):
        return [_inline(v, defs) for v in node]
    return node


def openapi_body(model: type[BaseModel]) -> dict[str, Any]:
    """Keeps the request schema in /openapi.json although the route reads the body itself.

    Nested models are inlined: a `$defs` reference would not resolve inside the OpenAPI document.
    """
    schema = model.model_json_schema()
    schema = _inline(schema, schema.get("$defs", {}))
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": schema}}}}

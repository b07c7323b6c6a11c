"""Route classes that carry their API family, so errors can be rendered in that family's envelope.

The error handlers read `scope["route"].family`; a route without one (ops, FastAPI's docs) speaks
the Hugging Face dialect. A path no route serves is answered in the dialect of the API that owns
its prefix (UNROUTED_PREFIXES): the OpenAI SDK reads a 404 under /v1/ as an OpenAI error.
"""

from __future__ import annotations

import enum
from typing import Any

from fastapi.routing import APIRoute

from gateway.routes.common.body import RawRequestRoute


class Family(str, enum.Enum):
    OPENAI = "openai"  # {"error": {"message", "type", "param", "code"}}
    HF = "hf"  # {"error": "...", "error_type": "..."}, TGI and the hosted Inference API


DEFAULT_FAMILY = Family.HF
UNROUTED_PREFIXES = (("/v1/", Family.OPENAI), ("/admin/", Family.OPENAI))  # the admin API answers as OpenAI does


OPENAI_ERROR = {
    "type": "object",
    "required": ["error"],
    "properties": {
        "error": {
            "type": "object",
            "required": ["message", "type"],
            "properties": {
                "message": {"type": "string"},
                "type": {"type": "string"},
                "param": {"type": ["string", "null"]},
                "code": {"type": ["string", "null"]},
            },
        }
    },
}
HF_ERROR = {
    "type": "object",
    "required": ["error"],
    "properties": {
        "error": {"type": "string"},
        "error_type": {"type": "string"},
        "estimated_time": {"type": "number"},
    },
}
# The statuses each family answers with (errors.py, the middleware's refusals); FastAPI would
# otherwise document only its own {"detail"} 422, a shape this server never sends.
_WHY = {
    400: "Invalid request, or over an input limit",
    401: "Missing or invalid API key",
    403: "The key lacks the scope this path needs",
    404: "Unknown model (or one the key may not use)",
    409: "Conflict (no key store configured)",
    413: "Body over server.max_body_bytes",
    422: "Invalid input (Hugging Face and TGI routes)",
    429: "Over a per-key limit or the model's queue (Retry-After)",
    431: "Headers over server.max_header_bytes",
    500: "Internal error",
    502: "An upstream failed",
    503: "Model loading, or the server is shutting down",
    504: "An upstream timed out",
}
_OPENAI_STATUSES = (400, 401, 403, 404, 409, 413, 429, 431, 500, 502, 503, 504)
_HF_STATUSES = (401, 403, 404, 413, 422, 429, 431, 500, 502, 503, 504)


def error_responses(family: Family) -> dict[int | str, dict[str, Any]]:
    """The family's error responses, for the OpenAPI document."""
    schema, statuses = (OPENAI_ERROR, _OPENAI_STATUSES) if family is Family.OPENAI else (HF_ERROR, _HF_STATUSES)
    content = {"application/json": {"schema": schema}}
    documented: dict[int | str, dict[str, Any]] = {s: {"description": _WHY[s], "content": content} for s in statuses}
    # any other client error (405 on a known path...) takes the same envelope
    documented["4XX"] = {"description": "Other client errors, in the same envelope", "content": content}
    return documented


def _documented(family: Family, kwargs: dict[str, Any]) -> dict[str, Any]:
    kwargs["responses"] = {**error_responses(family), **(kwargs.get("responses") or {})}
    return kwargs


class OpenAIRoute(RawRequestRoute):
    """An OpenAI route whose endpoint takes only the Request and parses its own body."""

    family = Family.OPENAI

    def __init__(self, path: str, endpoint: Any, **kwargs: Any) -> None:
        super().__init__(path, endpoint, **_documented(self.family, kwargs))


class OpenAIBodyRoute(APIRoute):
    """An OpenAI route whose parameters FastAPI solves (path parameters, dependencies)."""

    family = Family.OPENAI

    def __init__(self, path: str, endpoint: Any, **kwargs: Any) -> None:
        super().__init__(path, endpoint, **_documented(self.family, kwargs))


class HFRoute(APIRoute):
    """A Hugging Face Inference API or TGI route."""

    family = Family.HF

    def __init__(self, path: str, endpoint: Any, **kwargs: Any) -> None:
        super().__init__(path, endpoint, **_documented(self.family, kwargs))


UNROUTED_SUFFIXES = (("/v1/chat/completions", Family.OPENAI),)  # the chat API under a model URL


def unrouted_family(path: str) -> Family:
    """The family that answers for a path no route serves (e.g. a model id with a newline, which
    no route pattern matches, under /models/{id}/v1/chat/completions: still OpenAI's)."""
    for suffix, family in UNROUTED_SUFFIXES:
        if path.endswith(suffix):
            return family
    return next((family for prefix, family in UNROUTED_PREFIXES if path.startswith(prefix)), DEFAULT_FAMILY)

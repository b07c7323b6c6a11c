"""Route classes that carry their API family, so errors can be rendered in that family's envelope.

The error handlers read `scope["route"].family`; a route without one (ops, FastAPI's docs) speaks
the Hugging Face dialect. A path no route serves is answered in the dialect of the API that owns
its prefix (UNROUTED_PREFIXES): the OpenAI SDK reads a 404 under /v1/ as an OpenAI error.
"""

from __future__ import annotations

import enum

from fastapi.routing import APIRoute

from gateway.routes.common.body import RawRequestRoute


class Family(str, enum.Enum):
    OPENAI = "openai"  # {"error": {"message", "type", "param", "code"}}
    HF = "hf"  # {"error": "...", "error_type": "..."}, TGI and the hosted Inference API


DEFAULT_FAMILY = Family.HF
UNROUTED_PREFIXES = (("/v1/", Family.OPENAI),)


class OpenAIRoute(RawRequestRoute):
    """An OpenAI route whose endpoint takes only the Request and parses its own body."""

    family = Family.OPENAI


class OpenAIBodyRoute(APIRoute):
    """An OpenAI route whose parameters FastAPI solves (path parameters, dependencies)."""

    family = Family.OPENAI


class HFRoute(APIRoute):
    """A Hugging Face Inference API or TGI route."""

    family = Family.HF


def unrouted_family(path: str) -> Family:
    """The family that answers for a path no route serves."""
    return next((family for prefix, family in UNROUTED_PREFIXES if path.startswith(prefix)), DEFAULT_FAMILY)

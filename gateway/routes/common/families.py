"""Route classes that carry their API family, so errors can be rendered in that family's envelope."""

from __future__ import annotations

import enum

from fastapi.routing import APIRoute

from gateway.routes.common.body import RawRequestRoute


class Family(str, enum.Enum):
    OPENAI = "openai"  # {"error": {"message", "type", "param", "code"}}
    HF = "hf"  # {"error": "...", "error_type": "..."}, TGI and the hosted Inference API


class OpenAIRoute(RawRequestRoute):
    """An OpenAI route whose endpoint takes only the Request and parses its own body."""

    family = Family.OPENAI


class OpenAIBodyRoute(APIRoute):
    """An OpenAI route whose parameters FastAPI solves (path parameters, dependencies)."""

    family = Family.OPENAI


class HFRoute(APIRoute):
    """A Hugging Face Inference API or TGI route."""

    family = Family.HF

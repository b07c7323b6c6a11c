"""Input limits (server.max_*): each a 4xx in the API's own shape, checked before any work."""

from __future__ import annotations

from typing import Any

from gateway.config import ServerSettings
from gateway.errors import InputTooLarge
from gateway.validation import json_depth_over


def check_depth(server: ServerSettings, raw: bytes) -> None:
    if json_depth_over(raw, server.max_json_depth):
        raise InputTooLarge(f"The JSON body nests deeper than {server.max_json_depth} levels.")


def _too_many(what: str, count: int, limit: int, param: str) -> None:
    if count > limit:
        raise InputTooLarge(f"At most {limit} {what} per request (got {count}).", param=param)


def check_counts(
    server: ServerSettings,
    *,
    messages: list[Any] | None = None,
    n: int | None = None,
    stop: str | list[str] | tuple[str, ...] | None = None,
    logit_bias: object = None,
) -> None:
    """Messages, choices, stop sequences and logit_bias entries within their limits."""
    if messages is not None:
        _too_many("messages", len(messages), server.max_messages, "messages")
    if n is not None:
        _too_many("choices (n)", n, server.max_n, "n")
    if stop is not None and not isinstance(stop, str):
        _too_many("stop sequences", len(stop), server.max_stop, "stop")
    if isinstance(logit_bias, dict):
        _too_many("logit_bias entries", len(logit_bias), server.max_logit_bias, "logit_bias")

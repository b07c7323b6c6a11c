"""The SSE edge: typed chunk streams become `data:` events here and nowhere else.

Each event is one line of JSON followed by a blank line (the HF client parses
line by line). Errors after the 200 went out are sent in-band, readable by both
the OpenAI SDK and huggingface_hub, then the stream ends cleanly. When the
client disconnects, sse-starlette cancels the producer, which closes the
backend stream and so stops its generation.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable
from typing import Any

import orjson
from sse_starlette import EventSourceResponse

from gateway.errors import BackendFailure, GatewayError

log = logging.getLogger(__name__)

DONE = "[DONE]"


def sse_response(
    chunks: AsyncIterator[dict[str, Any]],
    *,
    error_event: Callable[[GatewayError], dict[str, Any]],
    done_marker: bool = True,
    ping_seconds: float = 0.0,
    headers: dict[str, str] | None = None,
) -> EventSourceResponse:
    async def events() -> AsyncIterator[str]:
        try:
            async for chunk in chunks:
                yield orjson.dumps(chunk).decode()
        except GatewayError as exc:
            yield orjson.dumps(error_event(exc)).decode()
        except Exception as exc:  # after the 200 only an in-band error can tell the client
            log.exception("stream failed")
            yield orjson.dumps(error_event(BackendFailure(f"Stream failed: {type(exc).__name__}"))).decode()
        if done_marker:
            yield DONE

    return EventSourceResponse(
        events(),
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no", **(headers or {})},
        ping=ping_seconds,
        sep="\n",
    )

"""JSON responses serialised with orjson (the hot path of every non-streaming answer), and shared headers."""

from __future__ import annotations

from typing import Any

import orjson
from starlette.responses import JSONResponse


class FastJSONResponse(JSONResponse):
    def render(self, content: Any) -> bytes:
        return orjson.dumps(content, option=orjson.OPT_SERIALIZE_NUMPY)


def ignored_header(ignored: list[str]) -> dict[str, str]:
    """Names the accepted-but-ignored request fields (OpenAI routes), when there are any."""
    return {"x-gateway-ignored-params": ",".join(ignored)} if ignored else {}

"""TGI's answer on the wire, for the TGI routes and the text-generation models under HF's model URLs."""

from __future__ import annotations

from starlette.responses import Response

from gateway.protocol import hf, tgi
from gateway.routes.common.responses import FastJSONResponse
from gateway.routes.common.sse import sse_response
from gateway.services.tgi import Generations, Streamed


def tgi_response(out: Generations | Streamed, *, single: bool, ping_seconds: float) -> Response:
    """SSE events for a stream; else the JSON body (one object when `single` and one prompt, else a list)."""
    if isinstance(out, Streamed):
        events = tgi.stream_events(out.events, out.prompt, out.params, out.seed)
        return sse_response(events, error_event=hf.error_body, done_marker=False, ping_seconds=ping_seconds)
    body, headers = tgi.generation_response(out.results, out.params, single=single and not out.many)
    return FastJSONResponse(body, headers=headers)

"""TGI-compatible text generation: POST /, /generate, /generate_stream and GET /info.

They serve the default text-generation model (GET /health lives in routes/ops.py); the flow is
services/tgi.py's, the wire format protocol/tgi.py's.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from starlette.responses import Response

from gateway.domain import Task
from gateway.protocol import tgi
from gateway.routes.common.body import read_json_body
from gateway.routes.common.deps import StateDep, context
from gateway.routes.common.families import HFRoute
from gateway.routes.common.tgi import tgi_response
from gateway.services import tgi as generation
from gateway.services.resolve import name_default_model

router = APIRouter(tags=["tgi"], route_class=HFRoute)


async def _serve(request: Request, state: StateDep, *, stream: bool | None, single: bool) -> Response:
    """`stream` None: the body's `stream` decides. `single`: one object for one prompt, else a list."""
    ctx = context(request)
    name_default_model(state, ctx, Task.TEXT_GENERATION)  # a body refused below counts under that model
    call = tgi.read_call(await read_json_body(request))
    wants_stream = bool(call.stream) if stream is None else stream
    out = await generation.run(state, ctx, None, call, stream=wants_stream)
    return tgi_response(out, single=single, ping_seconds=state.settings.server.sse_ping_seconds)


async def compat_generate(request: Request, state: StateDep) -> Response:
    """POST /: `stream` in the body picks a stream or a list of one result."""
    return await _serve(request, state, stream=None, single=False)


async def generate(request: Request, state: StateDep) -> Response:
    return await _serve(request, state, stream=False, single=True)


async def generate_stream(request: Request, state: StateDep) -> Response:
    return await _serve(request, state, stream=True, single=True)


async def info(request: Request, state: StateDep) -> dict[str, Any]:
    return tgi.info_body(*generation.describe(state, context(request), None))


router.add_api_route("/", compat_generate, methods=["POST"], response_model=None)
router.add_api_route("/generate", generate, methods=["POST"], response_model=None)
router.add_api_route("/generate_stream", generate_stream, methods=["POST"], response_model=None)
router.add_api_route("/info", info, methods=["GET"])

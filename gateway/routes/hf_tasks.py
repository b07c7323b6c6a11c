"""The hosted Hugging Face Inference API layout.

POST /models/{id} runs the model's task; POST /pipeline/{task}/{id} forces a task; under each
model URL the client also finds /health and /info (and /v1/chat/completions, in openai_chat.py).
The suffixed routes are registered first, since `{model_id:path}` would swallow them.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from starlette.responses import Response

from gateway.domain import Task
from gateway.protocol import hf, tgi
from gateway.routes.common.body import read_json_body
from gateway.routes.common.deps import StateDep, context
from gateway.routes.common.families import HFRoute
from gateway.routes.common.responses import FastJSONResponse
from gateway.routes.common.tgi import tgi_response
from gateway.services import hf_tasks
from gateway.services import tgi as generation
from gateway.services.resolve import resolve_entry

router = APIRouter(tags=["huggingface"], route_class=HFRoute)


async def _run(request: Request, state: StateDep, model_id: str, forced: Task | None) -> Response:
    ctx = context(request)
    resolve_entry(state, ctx, model_id, placeholders=False)  # 404 first; a refused body counts under the model
    body = hf.read_body(await read_json_body(request), request.headers.get("content-type"))
    out = await hf_tasks.run(state, ctx, model_id, forced, body)
    if isinstance(out, hf_tasks.TaskOutcome):
        return FastJSONResponse(hf.shape_output(out.task, out.outputs, out.many))
    # a text-generation model answers as TGI does
    return tgi_response(out, single=False, ping_seconds=state.settings.server.sse_ping_seconds)


async def run_model(model_id: str, request: Request, state: StateDep) -> Response:
    return await _run(request, state, model_id, None)


async def run_pipeline(task: str, model_id: str, request: Request, state: StateDep) -> Response:
    return await _run(request, state, model_id, hf.parse_task(task))


async def model_health(model_id: str, request: Request, state: StateDep) -> dict[str, str]:
    """200 when the model serves now or loads on first use; 503 while loading or after a failure."""
    return {"status": "ok", "state": hf_tasks.health(state, context(request), model_id).value}


async def model_info(model_id: str, request: Request, state: StateDep) -> dict[str, Any]:
    return tgi.info_body(*generation.describe(state, context(request), model_id))


router.add_api_route("/models/{model_id:path}/health", model_health, methods=["GET"])
router.add_api_route("/models/{model_id:path}/info", model_info, methods=["GET"])
router.add_api_route("/pipeline/{task}/{model_id:path}", run_pipeline, methods=["POST"], response_model=None)
router.add_api_route("/models/{model_id:path}", run_model, methods=["POST"], response_model=None)

"""The hosted Hugging Face Inference API layout.

POST /models/{id} runs the model's task; POST /pipeline/{task}/{id} forces a task; under
each model URL the client also finds /v1/chat/completions, /health and /info. The
suffixed routes are registered first, since `{model_id:path}` would swallow them.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from starlette.responses import Response

from gateway.backends.registry import Entry, loading_error
from gateway.domain import EMBEDDING_TASKS, ModelState, Task
from gateway.errors import InvalidRequest, ModelNotReady
from gateway.protocol import hf
from gateway.protocol.openai import ChatCompletionRequest
from gateway.routes.common.body import openapi_body, parse_body
from gateway.routes.common.deps import StateDep, context
from gateway.routes.common.responses import FastJSONResponse
from gateway.routes.openai_chat import serve_chat
from gateway.routes.tgi import info_body, text_generation
from gateway.services.resolve import resolve_entry
from gateway.state import AppState

router = APIRouter(tags=["huggingface"])



def _entry(state: AppState, request: Request, model_id: str) -> Entry:
    return resolve_entry(state, context(request), model_id, placeholders=False)  # the URL names the model


def _by_input_shape(task: Task, inputs: Any) -> Task:
    """Embedding models serve both embedding tasks; the inputs' shape tells which one is meant."""
    if task not in EMBEDDING_TASKS:
        return task
    first = inputs[0] if isinstance(inputs, list) and inputs else inputs
    return Task.SENTENCE_SIMILARITY if isinstance(first, dict) else Task.FEATURE_EXTRACTION


async def _run(state: AppState, request: Request, entry: Entry, forced: Task | None) -> Response:
    body = hf.read_body(await request.body(), request.headers.get("content-type"))
    options = hf.options_of(body)
    backend = await state.registry.ensure_loaded(entry, wait=options.wait_for_model is not False)
    task = forced or entry.task
    if task is None:
        raise InvalidRequest(f"Model '{entry.spec.name}' has no task; use /pipeline/{{task}}/{entry.spec.name}.")
    call = hf.parse_call(body, task)
    if forced is None:
        task = _by_input_shape(task, call.inputs)
    if task == Task.TEXT_GENERATION:
        return await text_generation(state, request, entry, backend, call, shape="list", stream=bool(call.stream))
    task_request, many = hf.task_request(task, call)
    outputs = await backend.run_task(task_request)
    return FastJSONResponse(hf.shape_output(task, outputs, many))


async def run_model(model_id: str, request: Request, state: StateDep) -> Response:
    return await _run(state, request, _entry(state, request, model_id), None)


async def run_pipeline(task: str, model_id: str, request: Request, state: StateDep) -> Response:
    try:
        forced = Task(task)
    except ValueError:
        served = ", ".join(t.value for t in Task)
        raise InvalidRequest(f"Unknown task '{task}'. Tasks: {served}.", param="task") from None
    return await _run(state, request, _entry(state, request, model_id), forced)


async def model_chat(model_id: str, request: Request, state: StateDep) -> Response:
    """The OpenAI chat API under a model URL: the URL names the model, whatever the body says."""
    entry = _entry(state, request, model_id)
    body = await parse_body(request, ChatCompletionRequest)
    return await serve_chat(body.model_copy(update={"model": entry.spec.name}), request, state)


async def model_health(model_id: str, request: Request, state: StateDep) -> dict[str, str]:
    """200 when the model serves now or loads on first use; 503 while loading or after a failure."""
    entry = _entry(state, request, model_id)
    backend = entry.backend
    if backend.state == ModelState.FAILED:
        raise ModelNotReady(f"Model '{entry.spec.name}' failed to load: {backend.error}")
    if backend.state == ModelState.LOADING:
        raise loading_error(entry)
    return {"status": "ok", "state": backend.state.value}


async def model_info(model_id: str, request: Request, state: StateDep) -> dict[str, Any]:
    return info_body(_entry(state, request, model_id))


router.add_api_route(
    "/models/{model_id:path}/v1/chat/completions",
    model_chat,
    methods=["POST"],
    response_model=None,
    openapi_extra=openapi_body(ChatCompletionRequest),
)
router.add_api_route("/models/{model_id:path}/health", model_health, methods=["GET"])
router.add_api_route("/models/{model_id:path}/info", model_info, methods=["GET"])
router.add_api_route("/pipeline/{task}/{model_id:path}", run_pipeline, methods=["POST"], response_model=None)
router.add_api_route("/models/{model_id:path}", run_model, methods=["POST"], response_model=None)

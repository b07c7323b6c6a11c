"""The hosted Inference API's per-model calls: the model's task (or a forced one) on parsed inputs;
text-generation models answer as TGI does (services.tgi)."""

from __future__ import annotations

from typing import Any, NamedTuple

from gateway.backends.registry import loading_error
from gateway.context import RequestContext
from gateway.domain import EMBEDDING_TASKS, ModelState, Task
from gateway.errors import InvalidRequest, ModelNotReady
from gateway.protocol import hf
from gateway.protocol.tgi import adapter_of, reserved_tokens
from gateway.services import tgi
from gateway.services.resolve import resolve, resolve_entry
from gateway.state import AppState


class TaskOutcome(NamedTuple):
    task: Task
    outputs: list[Any]
    many: bool  # the inputs were a list: one output per item


def _by_input_shape(task: Task, inputs: Any) -> Task:
    """Embedding models serve both embedding tasks; the inputs' shape tells which one is meant."""
    if task not in EMBEDDING_TASKS:
        return task
    first = inputs[0] if isinstance(inputs, list) and inputs else inputs
    return Task.SENTENCE_SIMILARITY if isinstance(first, dict) else Task.FEATURE_EXTRACTION


async def run(
    state: AppState, ctx: RequestContext, model_id: str, forced: Task | None, body: Any
) -> TaskOutcome | tgi.Outcome:
    """Run `forced` or the model's task on `body` (hf.read_body's value); the URL names the model exactly."""
    options = hf.options_of(body)
    parameters = body.get("parameters") if isinstance(body, dict) else None
    if (adapter := adapter_of(parameters)) is not None:  # TGI's adapter_id: that model serves, not the URL's
        model_id = tgi.adapter_model(state, ctx, adapter)
    # only an explicit max_new_tokens is reserved: the task is not known before the model is
    cost = reserved_tokens(parameters, 1, default=0)
    wait = options.wait_for_model is not False
    target = await resolve(state, ctx, model_id, placeholders=False, wait=wait, cost=cost)
    task = forced or target.entry.task  # known once loaded
    if task is None:
        name = target.entry.spec.name
        raise InvalidRequest(f"Model '{name}' has no task; use /pipeline/{{task}}/{name}.")
    call = hf.parse_call(body, task)
    if forced is None:
        task = _by_input_shape(task, call.inputs)
    if task == Task.TEXT_GENERATION:
        return await tgi.run(state, ctx, target, call, stream=bool(call.stream))
    request, many = hf.task_request(task, call)
    return TaskOutcome(task, await target.backend.run_task(request), many)


def health(state: AppState, ctx: RequestContext, model_id: str) -> ModelState:
    """The model's state when it serves now or loads on first use; ModelNotReady while it loads or after a failure."""
    entry = resolve_entry(state, ctx, model_id, placeholders=False)
    backend = entry.backend
    if backend.state == ModelState.FAILED:
        how = "has failed" if backend.load_seconds is not None else "failed to load"  # loaded, then its engine died
        raise ModelNotReady(f"Model '{entry.spec.name}' {how}: {backend.error}")
    if backend.state == ModelState.LOADING:
        raise loading_error(entry)
    return backend.state

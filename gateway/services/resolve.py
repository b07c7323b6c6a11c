"""Model resolution: a request's model name to a loaded backend, and the metrics label it sets."""

from __future__ import annotations

from typing import NamedTuple

from gateway.backends.base import Backend
from gateway.backends.registry import Entry
from gateway.context import RequestContext
from gateway.domain import Task
from gateway.errors import ModelNotFound, TaskNotSupported
from gateway.state import AppState

# Names clients send when they mean "whatever this endpoint serves": the HF
# client's chat_completion sends "dummy", TGI-style OpenAI examples send "tgi".
PLACEHOLDER_NAMES = frozenset({"tgi", "dummy", "default"})

# Which model tasks can answer a request for a task.
COMPATIBLE_TASKS = {
    Task.FEATURE_EXTRACTION: {Task.FEATURE_EXTRACTION, Task.SENTENCE_SIMILARITY},
}


class Resolved(NamedTuple):
    entry: Entry
    backend: Backend


def resolve_entry(
    state: AppState, ctx: RequestContext, name: str | None, task: Task | None = None, *, placeholders: bool = True
) -> Entry:
    """The entry `name` means; None means the default model of `task` (TGI routes).

    With `placeholders`, a name in PLACEHOLDER_NAMES that no model has falls back to the default.
    Sets `ctx.model`, the metrics label: an unknown name counts as "unknown" (labels stay bounded).
    """
    registry = state.registry
    if name is None:
        entry = registry.default_for(task)
        if entry is None:
            what = f"default {task.value} model" if task is not None else "default model"
            raise ModelNotFound(f"({what})", registry.names())
        ctx.model = entry.spec.name
        return entry
    try:
        entry = registry.lookup(name)
    except ModelNotFound:
        default = registry.default_for(task) if placeholders and name in PLACEHOLDER_NAMES else None
        if default is None:
            ctx.model = "unknown"
            raise
        entry = default
    ctx.model = entry.spec.name
    return entry


def name_model(state: AppState, ctx: RequestContext, name: object, task: Task | None = None) -> None:
    """Label the request's metrics with the model it names, for a request refused before it is
    resolved (a body that fails validation): its 400 counts under that model, not under "none"."""
    if isinstance(name, str) and name and ctx.model is None:
        try:
            resolve_entry(state, ctx, name, task)
        except ModelNotFound:
            pass


def name_default_model(state: AppState, ctx: RequestContext, task: Task) -> None:
    """`name_model` for routes that serve the default model of `task` (TGI's)."""
    if ctx.model is None:
        try:
            resolve_entry(state, ctx, None, task)
        except ModelNotFound:
            pass


def check_task(entry: Entry, task: Task | None) -> None:
    """Refuse a model whose task (known once loaded, at the latest) cannot answer `task`."""
    if task is not None and entry.task is not None and entry.task not in COMPATIBLE_TASKS.get(task, {task}):
        raise TaskNotSupported(f"Model '{entry.spec.name}' serves {entry.task.value}, not {task.value}.", param="model")


async def resolve(
    state: AppState,
    ctx: RequestContext,
    name: str | None,
    task: Task | None = None,
    *,
    placeholders: bool = True,
    wait: bool = True,
) -> Resolved:
    """The entry and its loaded backend (loading a lazy model; `wait` false answers ModelNotReady
    while it loads), refused when the model's task cannot answer `task`. The request holds the
    model (an unload waits for it) until `ctx.release()`, which the middleware calls."""
    entry = resolve_entry(state, ctx, name, task, placeholders=placeholders)
    backend = await state.registry.ensure_loaded(entry, wait=wait)
    check_task(entry, task)
    # no await since ensure_loaded: the model cannot have started unloading in between
    ctx.releases.append(state.registry.lease(entry, backend, ctx.keep_alive).release)
    return Resolved(entry, backend)

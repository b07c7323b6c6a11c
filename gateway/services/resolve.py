"""Model resolution: a request's model name to a loaded backend, and the metrics label it sets."""

from __future__ import annotations

import logging
import math
from typing import NamedTuple

from gateway.auth.limits import RateLimited
from gateway.backends.base import Backend
from gateway.backends.registry import Entry
from gateway.context import RequestContext
from gateway.domain import GenerationRequest, Task
from gateway.errors import GatewayError, ModelNotFound, TaskNotSupported
from gateway.errors import RateLimited as RateLimitedError
from gateway.state import AppState

log = logging.getLogger(__name__)


class LimiterUnavailable(GatewayError):
    status_code = 503
    openai_type = "server_error"
    hf_error_type = "unavailable"
    code = "limits_unavailable"


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
        if entry is None or not _visible(ctx, entry):
            what = f"default {task.value} model" if task is not None else "default model"
            raise ModelNotFound(f"({what})", visible_names(state, ctx))
        ctx.model = entry.spec.name
        return entry
    try:
        entry = registry.lookup(name)
    except ModelNotFound:
        default = registry.default_for(task) if placeholders and name in PLACEHOLDER_NAMES else None
        if default is None:
            ctx.model = "unknown"
            raise ModelNotFound(name, visible_names(state, ctx)) from None
        entry = default
    if not _visible(ctx, entry):
        # As OpenAI does for a model a key may not use: 404 model_not_found, not 403, so a key
        # learns nothing about models outside its list (docs/security.md).
        ctx.model = "unknown"
        raise ModelNotFound(name, visible_names(state, ctx))
    ctx.model = entry.spec.name
    return entry


def _visible(ctx: RequestContext, entry: Entry) -> bool:
    return ctx.key is None or ctx.key.may_use(entry.spec.name)


def visible_names(state: AppState, ctx: RequestContext) -> list[str]:
    """The served names (and aliases) the caller's key may use."""
    names = state.registry.names()
    if ctx.key is None or ctx.key.models is None:
        return names
    return [n for e in state.registry.entries if ctx.key.may_use(e.spec.name) for n in (e.spec.name, *e.spec.aliases)]


def cost_of(request: GenerationRequest, prompts: int = 1) -> int:
    """Tokens reserved against a key's tokens-per-minute before the answer is known: what the
    request may generate (prompt tokens are charged once counted)."""
    return (request.sampling.max_tokens or 0) * request.sampling.n * prompts


async def admit(state: AppState, ctx: RequestContext, cost: int) -> None:
    """Charge the request to its key's limits (one request, `cost` tokens reserved), or refuse it
    with 429 and the x-ratelimit-* headers; the headers also go on the answer."""
    key, model = ctx.key, ctx.model
    if key is None or model is None or ctx.admission is not None:
        return
    limiter = state.access.limiter
    try:
        admission = limiter.admit_here(key, model, cost) if limiter.local else await limiter.admit(key, model, cost)
    except RateLimited as over:
        headers = {k.decode(): v.decode() for k, v in over.headers}
        headers["Retry-After"] = str(max(1, math.ceil(over.retry_after)))
        raise RateLimitedError(f"Rate limit reached for {over.what} on key '{key.name}'.", headers=headers) from None
    except Exception as exc:  # Redis unreachable: refuse rather than serve past a budget nobody counts
        log.warning("per-key limits unavailable: %s", exc)
        raise LimiterUnavailable("Per-key limits cannot be checked right now; retry shortly.") from None
    if admission is not None:  # the first and only charge of this request (checked above)
        ctx.admission = admission
        ctx.response_headers = admission.headers


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
    cost: int = 0,
) -> Resolved:
    """The entry and its loaded backend (loading a lazy model; `wait` false answers ModelNotReady
    while it loads), refused when the model's task cannot answer `task`; charged to the key's
    limits with `cost` tokens reserved. The request holds the model (an unload waits for it)
    until `ctx.release()`, which the middleware calls."""
    entry = resolve_entry(state, ctx, name, task, placeholders=placeholders)
    await admit(state, ctx, cost)
    backend = await state.registry.ensure_loaded(entry, wait=wait)
    check_task(entry, task)
    # no await since ensure_loaded: the model cannot have started unloading in between
    ctx.releases.append(state.registry.lease(entry, backend, ctx.keep_alive).release)
    return Resolved(entry, backend)

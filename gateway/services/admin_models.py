"""The admin flow for models at run time: list, add, load, unload, remove, reload the config, and
add or remove a routed model's deployments. Errors are the gateway's own (404, 409, 503)."""

from __future__ import annotations

import asyncio
import logging
import math
import time
from typing import Any

from gateway.backends.registry import Entry
from gateway.config import DeploymentSpec, ModelSpec
from gateway.domain import ModelState
from gateway.errors import ConfigError, InsufficientMemory, InvalidRequest, ModelNotReady
from gateway.state import AppState

log = logging.getLogger(__name__)


def describe(state: AppState, entry: Entry) -> dict[str, Any]:
    """One model as the admin API lists it: state, memory, last use, in-flight requests, keep_alive."""
    backend, spec = entry.backend, entry.spec
    memory = backend.memory_use()
    keep_alive = state.registry.keep_alive(entry)
    return {
        "name": spec.name,
        "aliases": spec.aliases,
        "backend": spec.backend.kind if spec.backend is not None else "routed",
        "deployments": [d.name for d in spec.deployments] if spec.deployments is not None else None,
        "task": entry.task.value if entry.task else None,
        "state": backend.state.value,
        "memory": None
        if memory is None
        else {"device": memory.device, "bytes": memory.bytes, "rss_delta_bytes": memory.rss_delta},
        "last_used": entry.used_at,
        "idle_seconds": None if entry.inflight else round(time.monotonic() - entry.last_used, 3),
        "in_flight": entry.inflight,
        "keep_alive": None if math.isinf(keep_alive) else keep_alive,
        "spec": spec.model_dump(mode="json", exclude_defaults=True),
        **({"error": backend.error} if backend.error else {}),  # why it failed, only when it has
    }


def list_models(state: AppState) -> dict[str, Any]:
    budget = state.registry.budget.devices()
    return {
        "object": "list",
        "data": [describe(state, e) for e in state.registry.entries],
        "memory_budget": budget,
    }


def one(state: AppState, name: str) -> dict[str, Any]:
    return describe(state, state.registry.lookup(name))


async def add(state: AppState, spec: ModelSpec, *, wait: bool) -> dict[str, Any]:
    """Serve `spec` (the config file's model schema); with `wait`, answer once it has loaded."""
    entry = state.registry.add(spec)
    if wait and spec.preload:
        try:
            await state.registry.ensure_loaded(entry)
        except InsufficientMemory:
            raise  # 503 naming the busy models; the model stays listed and loads when there is room
        except ModelNotReady:
            # a spec that does not load (a wrong path, a missing file) is not kept: 400 with why
            error = entry.backend.error
            await state.registry.unload(entry, remove=True, reason="admin")
            raise InvalidRequest(f"Model '{spec.name}' did not load: {error}") from None
    return describe(state, entry)


async def load(state: AppState, name: str) -> dict[str, Any]:
    """Load a served model now (lazy, or unloaded); 503 when it does not fit the memory budget."""
    entry = state.registry.lookup(name)
    try:
        await state.registry.ensure_loaded(entry)
    except ModelNotReady:
        if entry.backend.state != ModelState.FAILED:
            raise  # unloading, or no room: 503 with Retry-After
        # its spec does not load (a wrong path, a missing file): the caller's to fix, as on add
        raise InvalidRequest(f"Model '{entry.spec.name}' did not load: {entry.backend.error}") from None
    entry.touch()  # loaded on purpose: its keep_alive counts from now
    return describe(state, entry)


async def unload(state: AppState, name: str) -> dict[str, Any]:
    """Unload once its in-flight requests have finished; it stays listed and loads again when asked."""
    entry = state.registry.lookup(name)
    await state.registry.unload(entry)
    return describe(state, entry)


async def remove(state: AppState, name: str) -> dict[str, Any]:
    entry = state.registry.lookup(name)
    await state.registry.unload(entry, remove=True)
    return {"name": entry.spec.name, "removed": True}


async def reload_config(state: AppState) -> dict[str, Any]:
    """Read the configuration again and apply the model differences; other settings need a restart."""
    if state.settings_source is None:
        raise InvalidRequest("This gateway was not started from a configuration it can read again.")
    try:
        settings = await asyncio.to_thread(state.settings_source)
    except ConfigError as exc:
        raise InvalidRequest(exc.message, param="config") from None
    changes: dict[str, Any] = await state.registry.apply(settings)
    changes["restart_needed"] = [
        name for name in ("server", "cache_dir") if getattr(settings, name) != getattr(state.settings, name)
    ]
    state.settings = settings.model_copy(
        update={name: getattr(state.settings, name) for name in ("server", "cache_dir")}
    )
    return changes


async def reload_on_signal(state: AppState) -> None:
    """SIGHUP: the same reload, with its outcome in the logs."""
    try:
        changes = await reload_config(state)
        log.info("SIGHUP: configuration reloaded: %s", changes)
    except Exception as exc:
        log.error("SIGHUP: configuration not reloaded: %s", getattr(exc, "message", exc))


async def add_deployment(state: AppState, name: str, deployment: DeploymentSpec) -> dict[str, Any]:
    entry = state.registry.lookup(name)
    await state.registry.add_deployment(entry, deployment)
    return describe(state, entry)


async def remove_deployment(state: AppState, name: str, deployment: str) -> dict[str, Any]:
    entry = state.registry.lookup(name)
    await state.registry.remove_deployment(entry, deployment)
    return describe(state, entry)

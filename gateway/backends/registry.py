"""Public model names and aliases -> backends, and the backends' lifecycle."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass

from gateway.backends.base import Backend
from gateway.config import ModelSpec, Settings
from gateway.domain import ModelState, Task
from gateway.errors import ModelNotFound, ModelNotReady
from gateway.metrics import Metrics

log = logging.getLogger(__name__)

BackendFactory = Callable[[ModelSpec, Settings], Backend]


def default_backend_factory(spec: ModelSpec, settings: Settings) -> Backend:
    # Imported here so a gateway serving only fake or upstream models never imports torch.
    if spec.deployments is not None:
        from gateway.backends.routing import RoutingBackend

        backends: dict[str, Backend] = {}
        for d in spec.deployments:
            child = spec.model_copy(update={"backend": d.backend, "deployments": None})
            if d.backend.kind == "upstream":
                from gateway.backends.upstream import UpstreamBackend

                # metrics and logs name the deployment, not only the model
                backends[d.name] = UpstreamBackend(child, d.backend, deployment=f"{spec.name}/{d.name}")
            else:
                backends[d.name] = default_backend_factory(child, settings)
        return RoutingBackend(spec, backends)
    assert spec.backend is not None
    kind = spec.backend.kind
    if spec.backend.kind == "upstream":  # on the attribute, so mypy narrows the spec type
        from gateway.backends.upstream import UpstreamBackend

        return UpstreamBackend(spec, spec.backend)
    if kind == "fake":
        from gateway.backends.fake import FakeBackend

        return FakeBackend(spec)
    if kind == "local":
        from gateway.backends.local import LocalBackend

        return LocalBackend(spec, settings)
    raise ValueError(f"unknown backend kind {kind!r}")


# `estimated_time` when nothing has been measured yet (no load of this model, nor of any
# other to take a load rate from): the figure the hosted API's users fall back on.
UNMEASURED_LOAD_SECONDS = 20.0


def loading_error(entry: Entry) -> ModelNotReady:
    """The 503 for a model still loading, with the time it is expected to need."""
    estimate = entry.backend.estimated_load_seconds()
    return ModelNotReady(
        f"Model '{entry.spec.name}' is currently loading",
        estimated_time=UNMEASURED_LOAD_SECONDS if estimate is None else estimate,
    )


@dataclass
class Entry:
    spec: ModelSpec
    backend: Backend
    load_task: asyncio.Task[None] | None = None

    @property
    def task(self) -> Task | None:
        return self.spec.task or self.backend.info().task


class Registry:
    def __init__(self, settings: Settings, factory: BackendFactory = default_backend_factory) -> None:
        self._entries: dict[str, Entry] = {}
        self._by_name: dict[str, Entry] = {}
        for spec in settings.models:
            entry = Entry(spec=spec, backend=factory(spec, settings))
            self._entries[spec.name] = entry
            for name in (spec.name, *spec.aliases):
                self._by_name[name] = entry

    def attach_metrics(self, metrics: Metrics) -> None:
        """Hand the app's metrics to the backends that record their own (upstream, routing)."""
        for entry in self._entries.values():
            entry.backend.attach_metrics(metrics)

    # lookup ----------------------------------------------------------------
    @property
    def entries(self) -> list[Entry]:
        return list(self._entries.values())

    def names(self) -> list[str]:
        return list(self._entries)

    def lookup(self, name: str) -> Entry:
        entry = self._by_name.get(name)
        if entry is None:
            raise ModelNotFound(name, self.names())
        return entry

    def default_for(self, task: Task | None = None) -> Entry | None:
        """The model marked `default`, else the only model of `task`, else None.

        A default whose task is not known until it loads (e.g. a GGUF with no `task`) matches
        any task; callers check the task once it has loaded.
        """
        for entry in self._entries.values():
            if entry.spec.default and (task is None or entry.task in (task, None)):
                return entry
        candidates = [e for e in self._entries.values() if task is None or e.task == task]
        return candidates[0] if len(candidates) == 1 else None

    # lifecycle -------------------------------------------------------------
    def _begin_load(self, entry: Entry) -> asyncio.Task[None]:
        if entry.load_task is None:
            entry.load_task = asyncio.create_task(self._load(entry), name=f"load:{entry.spec.name}")
        return entry.load_task

    async def _load(self, entry: Entry) -> None:
        try:
            await entry.backend.start()
            log.info("model %s ready in %.1fs", entry.spec.name, entry.backend.load_seconds or 0)
        except Exception:
            log.exception("model %s failed to load", entry.spec.name)

    async def start(self) -> None:
        """Start loading every preloaded model; /ready tells when they are done."""
        for entry in self._entries.values():
            if entry.spec.preload:
                self._begin_load(entry)

    async def close(self) -> None:
        for entry in self._entries.values():
            if entry.load_task is not None and not entry.load_task.done():
                entry.load_task.cancel()
            await entry.backend.close()

    def ready(self) -> bool:
        """Every preloaded model is loaded, and no model has failed since it loaded."""
        return (
            all(e.backend.state == ModelState.READY for e in self._entries.values() if e.spec.preload)
            and not self.broken()
        )

    def broken(self) -> dict[str, str]:
        """Models that loaded and then failed (a dead engine), with why: they make /ready 503
        whether or not they were preloaded, as they were serving."""
        return {
            e.spec.name: e.backend.error or "failed"
            for e in self._entries.values()
            if e.backend.state == ModelState.FAILED and e.backend.load_seconds is not None
        }

    async def ensure_loaded(self, entry: Entry, *, wait: bool = True) -> Backend:
        """The loaded backend of `entry`, loading it first when it is lazy.

        With `wait` false a model still loading answers ModelNotReady at once.
        """
        backend = entry.backend
        if backend.state == ModelState.READY:
            return backend
        if backend.state == ModelState.FAILED:
            if backend.load_seconds is not None:  # it loaded, then stopped working
                raise ModelNotReady(f"Model '{entry.spec.name}' has failed: {backend.error}")
            raise ModelNotReady(f"Model '{entry.spec.name}' failed to load: {backend.error}")
        task = self._begin_load(entry)
        if not wait:
            raise loading_error(entry)
        await asyncio.shield(task)
        if backend.state != ModelState.READY:
            raise ModelNotReady(f"Model '{entry.spec.name}' failed to load: {backend.error}")
        return backend

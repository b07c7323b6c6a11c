"""Public model names and aliases -> backends, and the backends' lifecycle at run time.

The set of models changes while serving (admin API, config reload, idle and budget eviction).
Every request holds a lease on its model's entry from the moment it is resolved until its
response has been sent (middleware), so an unload waits for the requests in flight; a request
that arrives while its model unloads gets a 503 with Retry-After (never a closed engine). All of
this runs on the event loop: a lease is taken with no await between the last check and the count.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from gateway.backends.base import Backend, MemoryUse
from gateway.backends.budget import MemoryBudget
from gateway.config import DeploymentSpec, ModelSpec, Settings
from gateway.domain import ModelState, Task
from gateway.errors import Conflict, InsufficientMemory, InvalidRequest, ModelNotFound, ModelNotReady
from gateway.metrics import Metrics

if TYPE_CHECKING:
    from gateway.backends.routing import RoutingBackend

log = logging.getLogger(__name__)

BackendFactory = Callable[[ModelSpec, Settings], Backend]


def default_backend_factory(spec: ModelSpec, settings: Settings) -> Backend:
    # Imported here so a gateway serving only fake or upstream models never imports torch.
    if spec.deployments is not None:
        from gateway.backends.routing import RoutingBackend

        backends = {d.name: deployment_backend(spec, d, settings) for d in spec.deployments}
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


def deployment_backend(spec: ModelSpec, deployment: DeploymentSpec, settings: Settings) -> Backend:
    """One deployment of a routed model, as a backend of its own."""
    child = spec.model_copy(update={"backend": deployment.backend, "deployments": None})
    if deployment.backend.kind == "upstream":
        from gateway.backends.upstream import UpstreamBackend

        # metrics and logs name the deployment, not only the model
        return UpstreamBackend(child, deployment.backend, deployment=f"{spec.name}/{deployment.name}")
    return default_backend_factory(child, settings)


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


UNLOAD_RETRY_SECONDS = 2.0  # Retry-After while a model unloads (a later request loads it again)
REAP_INTERVAL = 0.25  # how often idle models are checked against their keep_alive


@dataclass(eq=False)
class Entry:
    spec: ModelSpec
    backend: Backend
    load_task: asyncio.Task[None] | None = None
    inflight: int = 0  # requests holding a lease
    last_used: float = field(default_factory=time.monotonic)
    used_at: float | None = None  # wall clock of the last request, for the admin listing
    keep_alive: float | None = None  # the last request's own keep_alive (None: the model's)
    unloading: bool = False  # new requests are refused; set for good once the entry is removed
    # Does not gate /ready: unloaded on purpose since it loaded, or added while serving (a model
    # loading at run time must not take a serving replica out of its load balancer).
    released: bool = False
    idle: asyncio.Event = field(default_factory=asyncio.Event)  # set while inflight == 0
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)  # one load or unload at a time

    def __post_init__(self) -> None:
        self.idle.set()

    @property
    def task(self) -> Task | None:
        return self.spec.task or self.backend.info().task

    @property
    def names(self) -> tuple[str, ...]:
        return (self.spec.name, *self.spec.aliases)

    def touch(self) -> None:
        self.last_used, self.used_at = time.monotonic(), time.time()


def unloading_error(entry: Entry) -> ModelNotReady:
    return ModelNotReady(
        f"Model '{entry.spec.name}' is being unloaded; a request after it has gone loads it again.",
        estimated_time=UNLOAD_RETRY_SECONDS,
    )


class Lease:
    """A request's hold on its model: counted until released (once, however often called)."""

    __slots__ = ("entry", "_held")

    def __init__(self, entry: Entry) -> None:
        self.entry, self._held = entry, True
        entry.inflight += 1
        entry.idle.clear()
        entry.touch()

    def release(self) -> None:
        if self._held:
            self._held = False
            entry = self.entry
            entry.inflight -= 1
            entry.touch()
            if entry.inflight == 0:
                entry.idle.set()


class Registry:
    def __init__(self, settings: Settings, factory: BackendFactory = default_backend_factory) -> None:
        self.settings = settings
        self.budget = MemoryBudget(settings.runtime)
        self._factory = factory
        self._metrics: Metrics | None = None
        self._entries: dict[str, Entry] = {}
        self._by_name: dict[str, Entry] = {}
        self._loading = asyncio.Lock()  # making room and loading a budgeted model: one at a time
        self._reaper: asyncio.Task[None] | None = None
        self._applying = asyncio.Lock()  # one config reload at a time
        self._digest: str | None = None
        for spec in settings.models:
            self._install(spec)

    def attach_metrics(self, metrics: Metrics) -> None:
        """Hand the app's metrics to the backends that record their own (upstream, routing)."""
        self._metrics = metrics
        for entry in self._entries.values():
            entry.backend.attach_metrics(metrics)

    def _new_backend(self, spec: ModelSpec) -> Backend:
        backend = self._factory(spec, self.settings)
        if self._metrics is not None:
            backend.attach_metrics(self._metrics)
        return backend

    def _install(self, spec: ModelSpec) -> Entry:
        self._digest = None
        entry = Entry(spec=spec, backend=self._new_backend(spec), released=self._reaper is not None)
        self._entries[spec.name] = entry
        for name in entry.names:
            self._by_name[name] = entry
        return entry

    def _uninstall(self, entry: Entry) -> None:
        self._digest = None
        if self._entries.get(entry.spec.name) is entry:
            del self._entries[entry.spec.name]
        for name in entry.names:
            if self._by_name.get(name) is entry:
                del self._by_name[name]

    def models_digest(self) -> str:
        """A digest of the served models' specs: the response cache keys on it, so an answer is never
        replayed for a model that was removed or replaced since (equal on replicas with equal models)."""
        if self._digest is None:
            specs = sorted(e.spec.model_dump_json() for e in self._entries.values())
            self._digest = hashlib.sha256("\n".join(specs).encode()).hexdigest()[:16]
        return self._digest

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

    def keep_alive(self, entry: Entry) -> float:
        """Seconds an idle model stays loaded: the last request's, else the model's, else the default."""
        for value in (entry.keep_alive, entry.spec.keep_alive, self.settings.runtime.keep_alive):
            if value is not None:
                return value
        return math.inf

    # lifecycle -------------------------------------------------------------
    def _begin_load(self, entry: Entry) -> asyncio.Task[None]:
        if entry.load_task is None:
            entry.load_task = asyncio.create_task(self._load(entry), name=f"load:{entry.spec.name}")
            entry.load_task.add_done_callback(_retrieve)
        return entry.load_task

    async def _load(self, entry: Entry) -> None:
        backend = entry.backend
        budgeted = backend.memory_estimate() is not None
        async with self._loading if budgeted else contextlib.nullcontext():
            if entry.backend is not backend:
                return  # unloaded or replaced while it waited
            try:
                await self._make_room(entry)
            except InsufficientMemory as exc:
                log.warning("model %s not loaded: %s", entry.spec.name, exc.message)
                entry.load_task = None  # a later request tries again
                raise
            log.info("model %s: %s -> loading", entry.spec.name, backend.state.value)
            try:
                await backend.start()
                memory = _describe_memory(backend.memory_use())
                log.info("model %s: loading -> ready in %.1fs%s", entry.spec.name, backend.load_seconds or 0, memory)
            except Exception:
                log.exception("model %s: loading -> failed", entry.spec.name)
            entry.touch()

    async def start(self) -> None:
        """Start loading every preloaded model (/ready tells when they are done), and the idle reaper."""
        for entry in self._entries.values():
            if entry.spec.preload:
                self._begin_load(entry)
        self._reaper = asyncio.create_task(self._reap(), name="registry:reaper")

    async def close(self) -> None:
        if self._reaper is not None:
            self._reaper.cancel()
        for entry in self._entries.values():
            if entry.load_task is not None and not entry.load_task.done():
                entry.load_task.cancel()
            await entry.backend.close()

    def ready(self) -> bool:
        """Every preloaded model is loaded (or was unloaded on purpose since), and none has failed since it loaded."""
        return (
            all(e.backend.state == ModelState.READY or e.released for e in self._entries.values() if e.spec.preload)
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
        """The loaded backend of `entry`, loading it first when it is lazy (or was unloaded).

        With `wait` false a model still loading answers ModelNotReady at once; a model being
        unloaded answers ModelNotReady with a Retry-After.
        """
        if entry.unloading:
            raise unloading_error(entry)
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
        if entry.unloading or entry.backend is not backend:
            raise unloading_error(entry)
        if backend.state != ModelState.READY:
            raise ModelNotReady(f"Model '{entry.spec.name}' failed to load: {backend.error}")
        return backend

    def lease(self, entry: Entry, backend: Backend, keep_alive: float | None = None) -> Lease:
        """Count a request on `backend` (what ensure_loaded returned, with no await since), so
        that an unload waits for it; refused if the model started unloading meanwhile."""
        if entry.unloading or entry.backend is not backend:
            raise unloading_error(entry)
        if keep_alive is not None:
            entry.keep_alive = keep_alive
        return Lease(entry)

    # memory ----------------------------------------------------------------
    async def _make_room(self, entry: Entry) -> None:
        """Unload least recently used idle models on the device until `entry` fits its budget;
        InsufficientMemory (503) names what holds the memory when that is not enough."""
        need = entry.backend.memory_estimate()
        if need is None:
            return
        limit = self.budget.limit(need.device)
        held = [(e, m) for e in self._entries.values() if e is not entry and (m := self._held(e, need.device))]
        free = limit - sum(m.bytes for _, m in held)
        victims: list[Entry] = []
        idle = sorted((e for e, _ in held if e.inflight == 0 and not e.unloading), key=lambda e: e.last_used)
        sizes = {e.spec.name: m.bytes for e, m in held}
        for candidate in idle:
            if free >= need.bytes:
                break
            victims.append(candidate)
            free += sizes[candidate.spec.name]
        if free < need.bytes:
            busy = ", ".join(f"{e.spec.name} ({_mib(m.bytes)})" for e, m in held if e not in victims) or "none"
            raise InsufficientMemory(
                f"Model '{entry.spec.name}' needs about {_mib(need.bytes)} of {need.device} memory; the budget is "
                f"{_mib(limit)} and the models holding the rest are in use: {busy}."
            )
        for victim in victims:
            log.info("evicting %s (least recently used, idle) to make room for %s", victim.spec.name, entry.spec.name)
            await self.unload(victim, reason="room")

    @staticmethod
    def _held(entry: Entry, device: str) -> MemoryUse | None:
        memory = entry.backend.memory_use()
        return memory if memory is not None and memory.device == device else None

    async def _reap(self) -> None:
        """Unload local models idle for longer than their keep_alive."""
        while True:
            await asyncio.sleep(REAP_INTERVAL)
            now = time.monotonic()
            for entry in list(self._entries.values()):
                if (
                    entry.inflight == 0
                    and not entry.unloading
                    and entry.backend.state == ModelState.READY
                    and entry.backend.memory_use() is not None
                    and now - entry.last_used >= self.keep_alive(entry)
                ):
                    log.info("model %s idle for %.1fs (keep_alive): unloading", entry.spec.name, now - entry.last_used)
                    try:
                        await self.unload(entry, reason="idle")
                    except Exception:  # the reaper keeps going for the other models
                        log.exception("model %s: idle unload failed", entry.spec.name)

    # changes at run time --------------------------------------------------
    async def unload(self, entry: Entry, *, remove: bool = False, reason: str = "admin") -> None:
        """Free `entry`'s model once its requests have finished (new ones get a 503 meanwhile).
        It stays listed, pending, and the next request loads it again; `remove` drops it."""
        async with entry.lock:
            if entry.load_task is not None and not entry.load_task.done():
                with contextlib.suppress(Exception):
                    await asyncio.shield(entry.load_task)  # let a load finish, then undo it
            backend = entry.backend
            if backend.state == ModelState.PENDING and not remove:
                return  # nothing loaded
            entry.unloading = True
            previous, backend.state = backend.state, ModelState.UNLOADING
            log.info(
                "model %s: %s -> unloading (%s, %d in flight)", entry.spec.name, previous.value, reason, entry.inflight
            )
            try:
                await asyncio.wait_for(entry.idle.wait(), self.settings.runtime.unload_timeout)
            except TimeoutError:
                log.warning(
                    "model %s: %d requests still running after %.0fs; unloading anyway",
                    entry.spec.name,
                    entry.inflight,
                    self.settings.runtime.unload_timeout,
                )
            try:
                await backend.close()
            except Exception:
                log.exception("model %s: closing failed", entry.spec.name)
            if self._metrics is not None:
                self._metrics.model_unloads.labels(entry.spec.name, reason).inc()
            if remove:
                self._uninstall(entry)
                log.info("model %s: unloading -> removed", entry.spec.name)
                return  # `unloading` stays set: a request still holding this entry gets a 503
            entry.backend, entry.load_task, entry.keep_alive = self._new_backend(entry.spec), None, None
            entry.released, entry.unloading = True, False
            log.info("model %s: unloading -> pending", entry.spec.name)

    def add(self, spec: ModelSpec) -> Entry:
        """Serve a new model (loaded now if `preload`, else on its first request)."""
        taken = [n for n in (spec.name, *spec.aliases) if n in self._by_name]
        if taken:
            raise Conflict(f"model name or alias already served: {', '.join(taken)}", param="name")
        if spec.default and (other := next((e for e in self._entries.values() if e.spec.default), None)):
            raise Conflict(f"'{other.spec.name}' is already the default model", param="default")
        entry = self._install(spec)
        log.info("model %s: added (%s)", spec.name, "loading" if spec.preload else "loads on first use")
        if spec.preload:
            self._begin_load(entry)
        return entry

    async def replace(self, spec: ModelSpec) -> Entry:
        """A served model's spec changed: the old one drains and goes, the new one comes."""
        await self.unload(self.lookup(spec.name), remove=True, reason="config")
        return self.add(spec)

    async def apply(self, settings: Settings) -> dict[str, list[str]]:
        """Serve what `settings` lists, touching only what changed: new models are added, gone ones
        removed, changed ones replaced (a routed model whose deployments alone changed keeps its
        model and the routing state of the deployments that stayed)."""
        async with self._applying:
            self.settings, self.budget = settings, MemoryBudget(settings.runtime)
            wanted = {spec.name: spec for spec in settings.models}
            changes: dict[str, list[str]] = {
                "added": [],
                "removed": [],
                "replaced": [],
                "redeployed": [],
                "unchanged": [],
            }
            gone = [e for e in self._entries.values() if e.spec.name not in wanted]
            await asyncio.gather(*(self.unload(e, remove=True, reason="config") for e in gone))
            changes["removed"] = [e.spec.name for e in gone]
            for spec in settings.models:
                entry = self._entries.get(spec.name)
                if entry is None:
                    self.add(spec)
                    changes["added"].append(spec.name)
                elif entry.spec == spec:
                    changes["unchanged"].append(spec.name)
                elif _only_deployments_differ(entry.spec, spec):
                    await self.redeploy(entry, spec)
                    changes["redeployed"].append(spec.name)
                else:
                    await self.replace(spec)
                    changes["replaced"].append(spec.name)
            log.info("configuration applied: %s", {k: v for k, v in changes.items() if v and k != "unchanged"})
            return changes

    # deployments of a routed model -----------------------------------------------------------
    def _router(self, entry: Entry) -> RoutingBackend:
        from gateway.backends.routing import RoutingBackend

        if not isinstance(entry.backend, RoutingBackend):
            raise Conflict(f"model '{entry.spec.name}' has no deployments (it has one `backend`)", param="name")
        return entry.backend

    async def add_deployment(self, entry: Entry, deployment: DeploymentSpec) -> None:
        router, spec = self._router(entry), entry.spec
        if any(d.name == deployment.name for d in spec.deployments or ()):
            raise Conflict(f"model '{spec.name}' already has a deployment '{deployment.name}'", param="name")
        backend = deployment_backend(spec, deployment, self.settings)
        try:
            await router.add_deployment(deployment.name, backend, self._metrics)
        except Exception as exc:
            await backend.close()
            raise InvalidRequest(f"deployment '{deployment.name}' did not start: {backend.error or exc}") from None
        entry.spec = spec.model_copy(update={"deployments": [*(spec.deployments or ()), deployment]})
        log.info("model %s: deployment %s added", spec.name, deployment.name)

    async def remove_deployment(self, entry: Entry, name: str) -> None:
        router, spec = self._router(entry), entry.spec
        if name in spec.routing.fallback:
            raise Conflict(f"deployment '{name}' is in the model's fallback list; change the config", param="name")
        try:
            await router.remove_deployment(name, self.settings.runtime.unload_timeout)
        except KeyError:
            raise ModelNotFound(
                f"{spec.name}/{name}", [f"{spec.name}/{d.name}" for d in spec.deployments or ()]
            ) from None
        except ValueError as exc:
            raise Conflict(str(exc), param="name") from None
        entry.spec = spec.model_copy(update={"deployments": [d for d in spec.deployments or () if d.name != name]})
        log.info("model %s: deployment %s removed", spec.name, name)

    async def redeploy(self, entry: Entry, spec: ModelSpec) -> None:
        old = {d.name: d for d in entry.spec.deployments or ()}
        new = {d.name: d for d in spec.deployments or ()}
        for name, deployment in new.items():
            if name in old and old[name] != deployment:
                await self.remove_deployment(entry, name)
            if name not in old or old[name] != deployment:
                await self.add_deployment(entry, deployment)
        for name in old.keys() - new.keys():
            await self.remove_deployment(entry, name)
        entry.spec = spec


def _only_deployments_differ(old: ModelSpec, new: ModelSpec) -> bool:
    if old.deployments is None or new.deployments is None:
        return False
    same = old.model_copy(update={"deployments": new.deployments}) == new
    return same and old.routing.fallback == new.routing.fallback


def _retrieve(task: asyncio.Task[None]) -> None:
    """A preload nobody awaits may end in InsufficientMemory: logged already, not 'never retrieved'."""
    if not task.cancelled():
        task.exception()


def _mib(size: int) -> str:
    return f"{size / 2**20:.0f} MiB"


def _describe_memory(memory: MemoryUse | None) -> str:
    if memory is None:
        return ""
    rss = "" if memory.rss_delta is None else f", RSS +{_mib(memory.rss_delta)}"
    return f", {_mib(memory.bytes)} on {memory.device}{rss}"

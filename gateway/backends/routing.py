"""One public model name over several deployments: balancing, ordered fallback, cooldown.

The router is itself a Backend, so routes never know whether a name is served by
one model or by many. A call goes to the balanced deployments first (those not in
`fallback`), picked by the strategy, then to each fallback in order. Only
failures that another deployment may not have (429 and 5xx) move a request on; a
client error (4xx) is answered at once. A stream moves on only before its first
event: after that the client has output, and a break becomes an in-band error.

A request has one deadline across every deployment it tries: the longest
`timeouts.total` of the model's upstreams. Each upstream works within what is left
of it; once it has passed no further upstream is tried, but a local deployment
still is, since it is there for when the upstreams fail, slowness included.
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from typing import Any, TypeVar, cast

from gateway.backends.base import Backend, Capability, GenerationEvent, ModelInfo, QueueStats
from gateway.config import ModelSpec
from gateway.domain import (
    EmbeddingRequest,
    EmbeddingResult,
    GenerationRequest,
    GenerationResult,
    ModelState,
    TaskRequest,
)
from gateway.errors import GatewayError, UpstreamError
from gateway.metrics import Metrics
from gateway.upstream.breaker import Breaker
from gateway.upstream.retry import request_deadline

log = logging.getLogger(__name__)
T = TypeVar("T")


@dataclass(eq=False)
class Deployment:
    name: str
    label: str  # "model/deployment": unique across the gateway, used in metrics
    backend: Backend
    breaker: Breaker
    outstanding: int = 0

    @property
    def remote(self) -> bool:
        return self.backend.remote


def moves_on(error: GatewayError) -> bool:
    """Whether another deployment might answer where this one failed."""
    return error.status_code >= 500 or error.status_code == 429


class RoutingBackend(Backend):
    def __init__(self, spec: ModelSpec, backends: dict[str, Backend]) -> None:
        super().__init__(spec.name)
        self.spec = spec
        self.routing = spec.routing
        cooldown = spec.routing.cooldown
        self.deployments = [
            Deployment(name, f"{spec.name}/{name}", backend, Breaker(cooldown.failures, cooldown.seconds))
            for name, backend in backends.items()
        ]
        by_name = {d.name: d for d in self.deployments}
        self.fallbacks = [by_name[n] for n in self.routing.fallback]
        self.balanced = [d for d in self.deployments if d.name not in self.routing.fallback]
        # the request's one deadline: the longest of its upstreams' (local deployments have none)
        self.total_timeout = max(
            (b.total_timeout for b in backends.values() if b.total_timeout is not None), default=None
        )
        self.capabilities = self._capabilities()
        self._turn = 0
        self._prober: asyncio.Task[None] | None = None
        self.attach_metrics(Metrics())

    def attach_metrics(self, metrics: Metrics) -> None:
        self._fallbacks = metrics.upstream_fallbacks
        self._cooldown_gauges = {d.name: metrics.upstream_cooldown.labels(d.label) for d in self.deployments}
        for d in self.deployments:
            self._cooldown_gauges[d.name].set(0)
            d.backend.attach_metrics(metrics)

    # deployments at run time: the others keep their breakers, counts and turn ----------------
    def _regroup(self) -> None:
        by_name = {d.name: d for d in self.deployments}
        self.fallbacks = [by_name[n] for n in self.routing.fallback if n in by_name]
        self.balanced = [d for d in self.deployments if d.name not in self.routing.fallback]
        self.total_timeout = max(
            (d.backend.total_timeout for d in self.deployments if d.backend.total_timeout is not None), default=None
        )
        self.capabilities = self._capabilities()

    async def add_deployment(self, name: str, backend: Backend, metrics: Metrics | None) -> None:
        """Start `backend` and put it in rotation (balanced: it is not in the model's fallback list)."""
        if any(d.name == name for d in self.deployments):
            raise ValueError(f"deployment '{name}' exists")
        cooldown = self.routing.cooldown
        deployment = Deployment(name, f"{self.name}/{name}", backend, Breaker(cooldown.failures, cooldown.seconds))
        if metrics is not None:
            backend.attach_metrics(metrics)
            self._cooldown_gauges[name] = metrics.upstream_cooldown.labels(deployment.label)
        await backend.start()  # a failure is raised before it joins the rotation
        self.deployments.append(deployment)
        self._regroup()

    async def remove_deployment(self, name: str, drain_seconds: float) -> None:
        """Take `name` out of rotation now; close it once its requests are done (or `drain_seconds`)."""
        deployment = next((d for d in self.deployments if d.name == name), None)
        if deployment is None:
            raise KeyError(name)
        if len(self.deployments) == 1:
            raise ValueError("a model keeps at least one deployment")
        self.deployments.remove(deployment)
        self._regroup()
        deadline = asyncio.get_running_loop().time() + drain_seconds
        while deployment.outstanding and asyncio.get_running_loop().time() < deadline:
            await asyncio.sleep(0.05)
        await deployment.backend.close()

    def _capabilities(self) -> frozenset[Capability]:
        """What any deployment can do. generate() is always this router's own call: it moves a whole
        answer on to the next deployment, where a stream moves on only before its first event."""
        return frozenset().union(*(d.backend.capabilities for d in self.deployments)) | {Capability.WHOLE_RESPONSE}

    # lifecycle -------------------------------------------------------------
    async def _load(self) -> None:
        results = await asyncio.gather(*(d.backend.start() for d in self.deployments), return_exceptions=True)
        for d, result in zip(self.deployments, results, strict=True):
            if isinstance(result, BaseException):
                log.error("deployment %s failed to start: %s", d.label, d.backend.error)
        if not any(d.backend.state == ModelState.READY for d in self.deployments):
            raise RuntimeError(
                "no deployment started: " + "; ".join(f"{d.name}: {d.backend.error}" for d in self.deployments)
            )
        self.capabilities = self._capabilities()  # local deployments know theirs once loaded

    async def close(self) -> None:
        if self._prober is not None:
            self._prober.cancel()
        await asyncio.gather(*(d.backend.close() for d in self.deployments), return_exceptions=True)

    def queue_stats(self) -> QueueStats | None:
        """The local deployments' engines together: the queue gauges stay for a routed model."""
        stats = [s for d in self.deployments if (s := d.backend.queue_stats()) is not None]
        if not stats:
            return None
        return QueueStats(sum(s.waiting for s in stats), sum(s.running for s in stats))

    def info(self) -> ModelInfo:
        ready = [d for d in self.deployments if d.backend.state == ModelState.READY] or self.deployments
        inner = ready[0].backend.info()
        task = self.spec.task or inner.task
        return ModelInfo(
            task=task,
            max_input_tokens=inner.max_input_tokens,
            max_total_tokens=inner.max_total_tokens,
            extra={"deployments": [d.name for d in self.deployments]},
        )

    # picking ---------------------------------------------------------------
    def candidates(self) -> list[Deployment]:
        """This request's order: the usable balanced deployments by strategy, then the fallbacks."""
        usable = [d for d in self.balanced if not d.breaker.open and d.backend.state == ModelState.READY]
        if usable:
            start = self._turn % len(usable)
            self._turn += 1
            usable = usable[start:] + usable[:start]
            if self.routing.strategy == "least_outstanding":
                usable.sort(key=lambda d: d.outstanding)  # stable: ties keep the round-robin order
        usable += [d for d in self.fallbacks if not d.breaker.open and d.backend.state == ModelState.READY]
        return usable

    def _attempts(self) -> Iterator[tuple[Deployment, float | None]]:
        """The deployments this request tries, in order, each with the request's deadline (loop time)."""
        loop = asyncio.get_running_loop()
        deadline = None if self.total_timeout is None else loop.time() + self.total_timeout
        tried = 0
        for d in self.candidates():
            if d.remote and deadline is not None and loop.time() >= deadline:
                continue  # no time left to wait on another upstream; a local deployment is still tried
            if tried:
                # labelled with where the request went, so a fallback to `local` shows as such
                self._fallbacks.labels(self.spec.name, d.label).inc()
            tried += 1
            yield d, deadline

    def _exhausted(self, last: GatewayError | None) -> GatewayError:
        if last is not None:
            return last
        waits = [d.breaker.retry_after() for d in self.deployments if d.breaker.open]
        wait = min(waits) if waits else 0.0
        retry_after = max(1, math.ceil(wait or self.routing.cooldown.probe_interval))
        why = "cooling down after repeated failures" if waits else "none is loaded"
        return UpstreamError(
            f"Every deployment of model '{self.spec.name}' is unavailable ({why}).",
            status_code=503,
            headers={"Retry-After": str(retry_after)},
        )

    def _failed(self, d: Deployment, error: GatewayError) -> None:
        log.warning("deployment %s failed: %s", d.label, error.message)
        if d.breaker.failure():
            log.warning("deployment %s cooled down for %.1fs", d.label, d.breaker.seconds)
            self._cooldown_gauges[d.name].set(1)
            if self._prober is None or self._prober.done():
                self._prober = asyncio.create_task(self._probe_loop(), name=f"probe:{self.spec.name}")

    def _succeeded(self, d: Deployment) -> None:
        if d.breaker.consecutive or d.breaker.open:
            if d.breaker.success():
                self._cooldown_gauges[d.name].set(0)
                log.info("deployment %s is back in rotation", d.label)

    # probing ---------------------------------------------------------------
    async def _probe(self, d: Deployment) -> bool:
        try:
            return await d.backend.probe()
        except Exception:
            log.exception("probe of %s failed", d.label)
            return False

    async def _probe_loop(self) -> None:
        """Runs while some deployment is cooled down; probes each once its cooldown is over."""
        interval = self.routing.cooldown.probe_interval
        while True:
            for d in [d for d in self.deployments if d.breaker.probe_due()]:
                if await self._probe(d):
                    self._succeeded(d)
            still = [d for d in self.deployments if d.breaker.open]
            if not still:
                return
            wait = min(d.breaker.retry_after() for d in still)
            await asyncio.sleep(wait if wait > 0 else interval)

    # operations ------------------------------------------------------------
    async def _call(self, operation: Callable[[Backend], Awaitable[T]]) -> T:
        last: GatewayError | None = None
        for d, deadline in self._attempts():
            d.outstanding += 1
            try:
                with request_deadline(deadline):
                    result = await operation(d.backend)
            except GatewayError as error:
                if not moves_on(error):
                    raise
                self._failed(d, error)
                last = error
                continue
            finally:
                d.outstanding -= 1
            self._succeeded(d)
            return result
        raise self._exhausted(last)

    async def generate(self, request: GenerationRequest) -> GenerationResult:
        return await self._call(lambda b: b.generate(request))

    async def embed(self, request: EmbeddingRequest) -> EmbeddingResult:
        return await self._call(lambda b: b.embed(request))

    async def run_task(self, request: TaskRequest) -> Any:
        return await self._call(lambda b: b.run_task(request))

    async def generate_stream(self, request: GenerationRequest) -> AsyncIterator[GenerationEvent]:
        last: GatewayError | None = None
        for d, deadline in self._attempts():
            # a stream that can be closed (every backend's generate_stream returns an async generator)
            stream = cast(AsyncGenerator[GenerationEvent, None], d.backend.generate_stream(request))
            d.outstanding += 1
            streaming = False
            try:
                try:
                    with request_deadline(deadline):  # set and reset within this one step of the stream
                        first = await anext(stream)
                except StopAsyncIteration:
                    self._succeeded(d)
                    return
                except GatewayError as error:
                    if not moves_on(error):
                        raise
                    self._failed(d, error)
                    last = error
                    continue
                streaming = True
                self._succeeded(d)
                yield first
                async for event in stream:
                    yield event
                return
            except GatewayError as error:
                if streaming and moves_on(error):
                    self._failed(d, error)  # broke mid-stream: the client gets it in-band
                raise
            finally:
                d.outstanding -= 1
                await stream.aclose()
        raise self._exhausted(last)

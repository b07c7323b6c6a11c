"""A model served by another server over HTTP, behind the same Backend interface as a local one.

Each call retries connect errors, timeouts, 429 and 502-504 with backoff, within
a per-try timeout and one total deadline (the request's, when a router set one). A
stream is retried only until its first event: after that the client has output, a
break becomes an in-band error, and only the idle timeout (`per_try` between two
chunks) applies, not the total deadline.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

import orjson

from gateway import tracing
from gateway.backends.base import Backend, Capability, GenerationEvent, ModelInfo
from gateway.config import ModelSpec, UpstreamBackendSpec
from gateway.domain import (
    EmbeddingRequest,
    EmbeddingResult,
    GenerationRequest,
    GenerationResult,
    TaskRequest,
)
from gateway.errors import GatewayError, TaskNotSupported, UpstreamError
from gateway.logs import note
from gateway.metrics import Metrics
from gateway.upstream import dialects
from gateway.upstream.http1 import Response
from gateway.upstream.retry import RetryableFailure, backoff_delay, call_deadline
from gateway.upstream.transport import TRANSPORT_ERRORS, Transport

log = logging.getLogger(__name__)

T = TypeVar("T")
_DEFAULT_HEALTH = {"openai": "/models", "tgi": "/health", "hf": None}
# What each dialect's server does. generate() is one whole-answer call, not the stream collected.
_CAPABILITIES = {
    "openai": frozenset(
        {Capability.GENERATE, Capability.EMBED, Capability.WHOLE_RESPONSE, Capability.LOGPROBS, Capability.ECHO}
    ),
    "tgi": frozenset({Capability.GENERATE, Capability.WHOLE_RESPONSE, Capability.LOGPROBS}),  # TGI's details
    "hf": frozenset({Capability.GENERATE, Capability.EMBED, Capability.HF_TASKS, Capability.WHOLE_RESPONSE}),
}


class _StreamBroken(UpstreamError):
    """The connection failed mid-stream: retryable before the first event, in-band after it."""

    def __init__(self, message: str, *, timed_out: bool) -> None:
        super().__init__(message)
        self.timed_out = timed_out


class UpstreamBackend(Backend):
    remote = True

    def __init__(self, spec: ModelSpec, upstream: UpstreamBackendSpec, deployment: str | None = None) -> None:
        super().__init__(spec.name)
        self.capabilities = _CAPABILITIES[upstream.dialect]
        self.total_timeout = upstream.timeouts.total
        self.spec = spec
        self.upstream = upstream
        self.deployment = deployment or spec.name
        self.where = f"Upstream '{self.deployment}'"
        self.model = upstream.model or spec.name
        self.health_path = upstream.health_path or _DEFAULT_HEALTH[upstream.dialect]
        self.transport: Transport | None = None
        self.attach_metrics(Metrics())

    def attach_metrics(self, metrics: Metrics) -> None:
        # Children bound once: label lookups stay off the hot path.
        dep = self.deployment
        self._outcomes: dict[str, Any] = {}
        self._requests = lambda outcome: (
            self._outcomes.get(outcome)
            or self._outcomes.setdefault(outcome, metrics.upstream_requests.labels(dep, outcome))
        )
        self._retries = metrics.upstream_retries.labels(dep)
        self._latency = metrics.upstream_latency.labels(dep)
        self._ttfb = metrics.upstream_ttfb.labels(dep)

    # lifecycle -------------------------------------------------------------
    async def _load(self) -> None:
        headers = dict(self.upstream.headers)
        if self.upstream.api_key_env:
            key = os.environ.get(self.upstream.api_key_env)
            if not key:
                raise RuntimeError(f"environment variable {self.upstream.api_key_env} (api_key_env) is not set")
            headers["Authorization"] = f"Bearer {key}"
        self.transport = Transport(
            self.upstream.url,
            headers,
            connect_timeout=self.upstream.timeouts.connect,
            max_connections=self.upstream.max_connections,
        )
        await self.transport.open()

    async def close(self) -> None:
        if self.transport is not None:
            await self.transport.close()

    def info(self) -> ModelInfo:
        return ModelInfo(task=self.spec.task, extra={"upstream": self.upstream.dialect})

    async def probe(self) -> bool:
        """Whether the upstream looks alive again (for the circuit breaker)."""
        if self.transport is None:
            return False
        if self.health_path is None:
            # An HF endpoint has no standard health route: ask it for a small real answer.
            probe = dialects.hf_probe(self.spec.task)
            return await self.transport.alive("", self.upstream.timeouts.per_try, probe)
        return await self.transport.alive(self.health_path, self.upstream.timeouts.connect)

    # retries ---------------------------------------------------------------
    async def _with_retries(self, attempt: Callable[[float], Awaitable[T]]) -> T:
        """Run `attempt(timeout)` until it succeeds, fails for good, or the deadline leaves no room."""
        loop = asyncio.get_running_loop()
        limits, policy = self.upstream.timeouts, self.upstream.retry
        deadline = call_deadline(loop.time(), limits.total)
        retries = 0
        while True:
            started = loop.time()
            if started >= deadline:  # the router spent the request's deadline on other deployments
                self._requests("timeout").inc()
                raise UpstreamError(f"{self.where} was not tried: the request's deadline had passed.", status_code=504)
            try:
                with tracing.span(
                    "upstream.attempt", **{"gateway.deployment": self.deployment, "gateway.retry": retries}
                ):
                    result = await attempt(min(limits.per_try, deadline - started))
                note(deployment=self.deployment)  # the request's log line names who answered
            except RetryableFailure as failure:
                self._requests(failure.kind).inc()
                retries += 1
                wait = backoff_delay(retries, policy.backoff_base, policy.backoff_max, failure.retry_after)
                if (
                    retries > policy.max_retries
                    or (failure.retry_after or 0.0) > policy.max_retry_after
                    or loop.time() + wait >= deadline
                ):
                    raise failure.to_error() from None
                self._retries.inc()
                log.info("%s retry %d in %.2fs", failure.message, retries, wait)
                await asyncio.sleep(wait)
                continue
            except GatewayError as error:
                self._requests("rejected" if error.status_code < 500 else "error").inc()
                raise
            return result

    async def _post_json(
        self, path: str, body: dict[str, Any], parse: Callable[..., T], header: str | None = None
    ) -> T:
        """POST `body` and read the answer with `parse`: an answer it refuses is an error, not "ok".
        With `header`, `parse` also gets that response header's value (None when absent)."""
        assert self.transport is not None
        transport = self.transport
        loop = asyncio.get_running_loop()
        started = loop.time()

        async def attempt(timeout: float) -> Any:
            began = loop.time()
            response, payload = await transport.fetch(path, body, timeout=timeout, where=self.where)
            self._ttfb.observe(response.head_at - began)  # when the response's head was in
            try:
                data = orjson.loads(payload)
            except orjson.JSONDecodeError:
                raise UpstreamError(f"{self.where} sent a body that is not JSON.") from None
            return parse(data) if header is None else parse(data, response.headers.get(header))

        data = await self._with_retries(attempt)
        self._requests("ok").inc()
        self._latency.observe(loop.time() - started)
        return data

    # operations ------------------------------------------------------------
    def _generation_call(self, request: GenerationRequest, stream: bool) -> tuple[str, dict[str, Any], Any]:
        dialect = self.upstream.dialect
        if dialect == "openai":
            path, body = dialects.openai_generation(request, self.model, stream)
            return path, body, dialects.OpenAIStream(request.sampling.n, dialects.kept_stops(request))
        body = {"inputs": request.prompt, "parameters": dialects.tgi_parameters(request)}
        parser = dialects.TGIStream(dialects.dropped_stops(request))
        if dialect == "tgi":
            return ("/generate_stream" if stream else "/generate"), body, parser
        body["stream"] = stream  # HF endpoints: everything is posted to the model URL itself
        return "", body, parser

    async def generate(self, request: GenerationRequest) -> GenerationResult:
        path, body, _ = self._generation_call(request, stream=False)
        if self.upstream.dialect == "openai":
            keep = dialects.kept_stops(request)
            return await self._post_json(
                path, body, lambda data: dialects.openai_result(data, request.sampling.n, keep)
            )
        drop = dialects.dropped_stops(request)
        # TGI gives the prompt's length in a header only (its non-streamed details have no input_length).
        return await self._post_json(
            path, body, lambda data, prompt: dialects.tgi_result(data, drop, prompt), header="x-prompt-tokens"
        )

    async def generate_stream(self, request: GenerationRequest) -> AsyncIterator[GenerationEvent]:
        path, body, parser = self._generation_call(request, stream=True)
        assert self.transport is not None
        transport = self.transport
        loop = asyncio.get_running_loop()
        started = loop.time()
        idle = self.upstream.timeouts.per_try

        async def open_and_prime(timeout: float) -> tuple[Response, list[GenerationEvent]]:
            # Nothing has reached the client until this returns, so a failure here may be retried.
            # `timeout` (this try, within the deadline) bounds the wait for the first event; every
            # read, then and after, is bounded by the idle timeout alone.
            try:
                return await asyncio.wait_for(prime(), timeout)
            except asyncio.TimeoutError:
                raise RetryableFailure(f"{self.where} timed out.", status=504, kind="timeout") from None

        async def prime() -> tuple[Response, list[GenerationEvent]]:
            began = loop.time()
            response = await transport.stream(path, body, idle=idle, where=self.where)
            try:
                first = await self._next_events(response, parser)
            except _StreamBroken as broken:
                response.close()
                status, kind = (504, "timeout") if broken.timed_out else (502, "stream_broken")
                raise RetryableFailure(broken.message, status=status, kind=kind) from None
            except BaseException:
                response.close()
                raise
            if first is None:
                response.close()
                raise RetryableFailure(
                    f"{self.where} ended the stream before any output.", status=502, kind="stream_broken"
                )
            self._ttfb.observe(loop.time() - began)  # the first event is in
            return response, first

        response, primed = await self._with_retries(open_and_prime)
        events: list[GenerationEvent] | None = primed
        outcome = "stream_broken"
        try:
            while events is not None:
                for event in events:
                    yield event
                events = await self._next_events(response, parser)
            if not parser.complete:
                raise UpstreamError(f"{self.where} ended the stream before it was complete.")
            outcome = "ok"
            yield parser.end()
        except (GeneratorExit, asyncio.CancelledError):
            outcome = "client_closed"
            raise
        finally:
            # Closing (not releasing) drops the connection, so an upstream still generating stops.
            response.close()
            self._requests(outcome).inc()
            self._latency.observe(loop.time() - started)

    async def _next_events(self, response: Response, parser: Any) -> list[GenerationEvent] | None:
        """The domain events of the next upstream SSE event that has any; None at the end of the stream."""
        if parser.done:
            return None
        try:
            while True:
                line = await response.readline()
                if not line:
                    return None
                if not line.startswith(b"data:"):
                    continue  # blank separators, comments, event names
                payload = line[5:].strip()
                if payload == b"[DONE]":
                    parser.done = True
                    return None
                try:
                    data = orjson.loads(payload)
                except orjson.JSONDecodeError:
                    raise UpstreamError(f"{self.where} sent a stream event that is not JSON.") from None
                if not isinstance(data, dict):
                    raise UpstreamError(f"{self.where} sent a stream event that is not a JSON object.")
                events = parser.feed(data)
                if events:
                    return events
        except (*TRANSPORT_ERRORS, ValueError) as exc:
            raise _StreamBroken(
                f"{self.where} broke off the stream ({type(exc).__name__}).",
                timed_out=isinstance(exc, asyncio.TimeoutError),
            ) from None

    async def embed(self, request: EmbeddingRequest) -> EmbeddingResult:
        count = len(request.inputs)
        if self.upstream.dialect == "openai":
            path, body = dialects.openai_embedding(request, self.model)
            return await self._post_json(path, body, lambda data: dialects.openai_embedding_result(data, count))
        if self.upstream.dialect == "hf":
            body = {"inputs": list(request.inputs)}
            if request.normalize is not None:
                body["normalize"] = request.normalize
            return await self._post_json("", body, lambda data: dialects.hf_embedding_result(data, count))
        raise TaskNotSupported(f"Model '{self.name}' is served by TGI, which does not compute embeddings.")

    async def run_task(self, request: TaskRequest) -> Any:
        if self.upstream.dialect != "hf":
            raise TaskNotSupported(
                f"Model '{self.name}' does not serve the task '{request.task.value}' (its upstream is not an HF endpoint)."
            )
        items = list(request.inputs)
        if not any(isinstance(item, bytes) for item in items):
            return await self._post_json("", dialects.hf_task_body(items, request.parameters), _as_is)
        # Media: the hosted API takes one image per call, so one call per item, side by side, in order.
        calls = [
            asyncio.ensure_future(self._post_json("", dialects.hf_task_body(item, request.parameters), _as_is))
            for item in items
        ]
        try:
            return list(await asyncio.gather(*calls))
        finally:
            for call in calls:
                call.cancel()  # the others, once one has failed


def _as_is(data: Any) -> Any:
    return data

"""Pure ASGI middleware (no BaseHTTPMiddleware: it breaks streaming and disconnect detection).

One pass per request: request id (a contextvar, so every log line of the request carries it),
drain refusal, `Host` check, header and body caps, key and scope (on the ASGI path the app
routes), the request counter and latency histogram, per-key usage and limits settled, and the
request's log line. Per-request work is kept small: this is on every request's path.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections.abc import Callable
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from gateway import tracing
from gateway.auth.access import Access
from gateway.auth.keys import KeyScope
from gateway.auth.policy import allowed_hosts, host_name, keyless_admin_refusal, required_scope
from gateway.cache import Cached, MemoryCache, RedisCache, cache_key, cacheable, storable
from gateway.config import ServerSettings
from gateway.drain import Drain
from gateway.error_handlers import error_response, matching_route, stream_ending
from gateway.errors import Forbidden, GatewayError, InvalidRequest, ShuttingDown, Unauthorized
from gateway.ids import unique_hex
from gateway.logs import request_fields, request_id_var, request_line
from gateway.metrics import Metrics

log = logging.getLogger(__name__)

_SAFE_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")  # whole value (fullmatch): it is echoed and logged unquoted
CONTENT_BYTES = 16 * 1024  # with server.log_content: the most of each body a log line keeps
_PROBES = frozenset({"/health", "/ready"})  # answered during a drain and whatever the Host


class _BodyTooLarge(InvalidRequest):
    status_code = 413
    code = "request_too_large"


class _HeadersTooLarge(InvalidRequest):
    status_code = 431
    code = "headers_too_large"


class _BadHost(InvalidRequest):
    code = "invalid_host"


class _Exchange:
    """One request's response as it goes out: status, whether it began, whether it streams SSE."""

    __slots__ = ("send", "request_id", "state", "status", "started", "sse", "body")

    def __init__(self, send: Send, request_id: str, state: dict[str, Any], capture: bool = False) -> None:
        self.send = send
        self.body: list[bytes] | None = [] if capture else None  # kept for the log line (log_content)
        self.request_id = request_id.encode()
        self.state = state
        self.status = 500
        self.started = False
        self.sse = False

    async def __call__(self, message: Message) -> None:
        if message["type"] == "http.response.start":
            self.started = True
            self.status = message["status"]
            headers = message.get("headers") or []
            self.sse = any(k == b"content-type" and v.startswith(b"text/event-stream") for k, v in headers)
            context = self.state.get("context")
            if context is not None and context.response_headers:
                message["headers"] = [*headers, (b"x-request-id", self.request_id), *context.response_headers]
            else:
                message["headers"] = [*headers, (b"x-request-id", self.request_id)]
        elif self.body is not None and message["type"] == "http.response.body":
            self.body.append(message.get("body", b""))
        await self.send(message)


_HIT = (b"x-cache", b"hit")
_MISS = (b"x-cache", b"miss")
_DROPPED = frozenset({b"x-request-id", b"date", b"server"})  # per answer, never replayed


class _Recorder:
    """Passes an answer through (marked x-cache: miss) and keeps a copy for the cache."""

    __slots__ = ("exchange", "headers", "body", "complete")

    def __init__(self, exchange: _Exchange) -> None:
        self.exchange = exchange
        self.headers: list[tuple[bytes, bytes]] = []
        self.body: list[bytes] = []
        self.complete = False

    @property
    def started(self) -> bool:
        return self.exchange.started

    @property
    def sse(self) -> bool:
        return self.exchange.sse

    async def __call__(self, message: Message) -> None:
        if message["type"] == "http.response.start":
            headers = list(message.get("headers") or [])
            self.headers = [(k, v) for k, v in headers if k.lower() not in _DROPPED]
            message["headers"] = [*headers, _MISS]
        elif message["type"] == "http.response.body":
            self.body.append(message.get("body", b""))
            self.complete = not message.get("more_body", False)
        await self.exchange(message)


def _started(send: Any) -> bool:
    return bool(send.started)


def _sse(send: Any) -> bool:
    return bool(send.sse)


async def _read_all(receive: Receive) -> bytes:
    chunks = []
    while True:
        message = await receive()
        if message["type"] != "http.request":
            break
        chunks.append(message.get("body", b""))
        if not message.get("more_body", False):
            break
    return b"".join(chunks)


def _replaying(raw: bytes, receive: Receive) -> Receive:
    """The body already read, then the real channel (which then only reports a disconnect)."""
    sent = [False]

    async def replay() -> Message:
        if not sent[0]:
            sent[0] = True
            return {"type": "http.request", "body": raw, "more_body": False}
        return await receive()

    return replay


class GatewayMiddleware:
    def __init__(
        self,
        app: ASGIApp,
        *,
        metrics: Metrics,
        settings: ServerSettings,
        access: Access,
        drain: Drain,
        cache: MemoryCache | RedisCache | None = None,
        models_digest: Callable[[], str] = lambda: "",
    ) -> None:
        self.app = app
        self.cache = cache
        self.models_digest = models_digest
        self.metrics = metrics
        self.access = access
        self.drain = drain
        self.max_body_bytes = settings.max_body_bytes
        self.max_header_bytes = settings.max_header_bytes
        self.metrics_public = settings.metrics_public
        self.hosts = allowed_hosts(settings.allowed_hosts, settings.host)
        self.bind_host = settings.host
        self.log_requests = settings.json_logs
        self.log_content = settings.json_logs and settings.log_content
        self._children: dict[tuple[str, str, int], tuple[Any, Any]] = {}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        headers = dict(scope["headers"])
        incoming = headers.get(b"x-request-id", b"").decode("latin-1")
        request_id = incoming if incoming and _SAFE_ID.fullmatch(incoming) else unique_hex()
        reset = request_id_var.set(request_id)
        state: dict[str, Any] = scope.setdefault("state", {})
        if self.log_requests:
            fields: dict[str, Any] = {}
            state["log"] = fields
            request_fields.set(fields)
        state["request_id"] = request_id
        state["received_at"] = started
        state["key"] = None
        exchange = _Exchange(send, request_id, state, self.log_content)
        if self.log_content:
            state["body"] = []
        task: Any = asyncio.current_task()
        self.drain.enter(task)
        try:
            if tracing.enabled():
                with tracing.request_span(scope["method"], scope["path"], headers) as span:
                    await self._serve(scope, receive, headers, state, exchange, task)
                    span.set_attribute("http.response.status_code", exchange.status)
            else:
                await self._serve(scope, receive, headers, state, exchange, task)
        finally:
            try:
                await self._finish(scope, state, exchange, started)  # limits settled before a drain may end
            finally:
                self.drain.leave(task)
                request_id_var.reset(reset)

    async def _serve(
        self,
        scope: Scope,
        receive: Receive,
        headers: dict[bytes, bytes],
        state: dict[str, Any],
        exchange: _Exchange,
        task: asyncio.Task[Any],
    ) -> None:
        refusal = self._refusal(scope, headers, state)
        if refusal is not None:
            await error_response(refusal, scope)(scope, receive, exchange)
        elif self.cache is not None and scope["method"] == "POST" and cacheable(scope["path"]):
            await self._via_cache(scope, receive, headers, state, exchange, task)
        else:
            await self._run(scope, self._capped(receive, state.get("body")), exchange, task)

    def _refusal(self, scope: Scope, headers: dict[bytes, bytes], state: dict[str, Any]) -> GatewayError | None:
        """Why the request is refused before the app sees it (None: it goes on)."""
        path: str = scope["path"]
        probe = path in _PROBES
        if self.drain.draining and not probe:
            return ShuttingDown(
                "The server is shutting down; retry on another replica.", headers={"Connection": "close"}
            )
        if self.hosts is not None and not probe and host_name(headers.get(b"host", b"")) not in self.hosts:
            return _BadHost("Invalid Host header.")
        if self.max_header_bytes and sum(len(k) + len(v) for k, v in scope["headers"]) > self.max_header_bytes:
            return _HeadersTooLarge(f"Request headers exceed {self.max_header_bytes} bytes.")
        needed = required_scope(path, metrics_public=self.metrics_public)
        if needed is KeyScope.ADMIN and not self.access.enabled:
            if refused := keyless_admin_refusal(scope["method"], headers, self.bind_host):
                return Forbidden(refused)
        if needed is not None and self.access.enabled:
            key = self.access.ring.from_header(headers.get(b"authorization", b""))
            if key is None:
                return Unauthorized("Invalid or missing API key.")
            if needed not in key.scopes:
                return Forbidden(f"This key lacks the '{needed.value}' scope.")
            state["key"] = key
        declared = headers.get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_body_bytes:
            return _BodyTooLarge(f"Request body exceeds {self.max_body_bytes} bytes.")
        return None

    async def _run(self, scope: Scope, receive: Receive, exchange: Send, task: asyncio.Task[Any]) -> None:
        try:
            await self.app(scope, receive, exchange)
        except asyncio.CancelledError:
            if not self.drain.expired:
                raise
            if hasattr(task, "uncancel"):  # Python 3.11+: cancelled by the drain, end the response cleanly
                task.uncancel()
            await self._end_drained(scope, receive, exchange)
        except Exception:
            # Caught here rather than by an exception handler: Starlette re-raises after a
            # handler for Exception answers, and uvicorn then drops the keep-alive connection.
            log.exception("unhandled error on %s", scope["path"])
            if _started(exchange):
                return  # nothing more can be said once the response has begun
            await error_response(GatewayError("Internal server error."), scope)(scope, receive, exchange)

    async def _end_drained(self, scope: Scope, receive: Receive, exchange: Send) -> None:
        error = ShuttingDown("The server shut down before the answer was complete.")
        if not _started(exchange):
            await error_response(error, scope)(scope, receive, exchange)
            return
        body = stream_ending(error, scope) if _sse(exchange) else b""
        await exchange({"type": "http.response.body", "body": body, "more_body": False})

    async def _via_cache(
        self,
        scope: Scope,
        receive: Receive,
        headers: dict[bytes, bytes],
        state: dict[str, Any],
        exchange: _Exchange,
        task: asyncio.Task[Any],
    ) -> None:
        """Serve a cacheable request from the response cache, or run it and keep its answer."""
        assert self.cache is not None
        try:
            raw = await _read_all(self._capped(receive, state.get("body")))
        except _BodyTooLarge as exc:
            await error_response(exc, scope)(scope, receive, exchange)
            return
        key = state["key"]
        content_type = headers.get(b"content-type", b"").decode("latin-1")
        visibility = ("*" if key is None else key.visibility) + "@" + self.models_digest()
        cache_id, bypass = cache_key(scope["path"], raw, content_type, visibility)
        replay = _replaying(raw, receive)
        if cache_id is None:
            await self._run(scope, replay, exchange, task)
            return
        bypass = bypass or b"no-cache" in headers.get(b"cache-control", b"")
        hit = None if bypass else await self._cached(cache_id)
        if hit is not None:
            await self._replay(scope, state, hit, exchange)
            return
        recorder = _Recorder(exchange)
        await self._run(scope, replay, recorder, task)
        context = state.get("context")
        model = context.model if context is not None and context.model is not None else "none"
        self.metrics.cache_lookups.labels(model, "bypass" if bypass else "miss").inc()
        answer = Cached(exchange.status, recorder.headers, b"".join(recorder.body), model)
        if recorder.complete and storable(answer, exchange.sse):
            try:
                await self.cache.put(cache_id, answer)
            except Exception:  # Redis gone: the answer was served, it is just not kept
                log.warning("response cache unavailable", exc_info=True)

    async def _cached(self, cache_id: str) -> Cached | None:
        assert self.cache is not None
        try:
            return await self.cache.get(cache_id)
        except Exception:  # Redis gone: a miss
            log.warning("response cache unavailable", exc_info=True)
            return None

    async def _replay(self, scope: Scope, state: dict[str, Any], hit: Cached, exchange: _Exchange) -> None:
        scope["route"] = matching_route(scope)  # the metrics label, as if routed
        state["hit_model"] = hit.model
        self.metrics.cache_lookups.labels(hit.model, "hit").inc()
        key = state["key"]
        if key is not None:
            self.access.usage.add(key.name, hit.model, 0, 0)
        await exchange({"type": "http.response.start", "status": hit.status, "headers": [*hit.headers, _HIT]})
        await exchange({"type": "http.response.body", "body": hit.body, "more_body": False})

    async def _finish(self, scope: Scope, state: dict[str, Any], exchange: _Exchange, started: float) -> None:
        route = scope.get("route")
        label = getattr(route, "path", None) or "unmatched"
        # The RequestContext (services.resolve names its model), taken out of the state: it holds
        # the request's receive channel, which holds uvicorn's cycle, which holds the scope and so
        # this state: left there, the request's objects all wait for the garbage collector.
        context = state.pop("context", None)
        if context is not None:
            context.release()  # the model leases resolve took: the response is over
        if context is not None and context.model is not None:
            model = context.model
        else:
            model = state.get("hit_model", "none")
        key = (label, model, exchange.status)
        children = self._children.get(key)
        if children is None:  # labels() takes a lock and builds a tuple: once per label set only
            children = self._children[key] = (
                self.metrics.requests.labels(label, model, str(exchange.status)),
                self.metrics.request_latency.labels(label, model),
            )
        children[0].inc()
        elapsed = time.perf_counter() - started
        children[1].observe(elapsed)
        if context is not None and context.key is not None:
            self.access.account(
                context.key,
                context.model,
                context.prompt_tokens,
                context.completion_tokens,
                context.admission,
            )
        if self.log_requests:
            key = state["key"]
            extra = state["log"]
            if self.log_content:
                extra.update(request_body=_text(state.get("body")), response_body=_text(exchange.body))
            request_line(
                exchange.request_id,
                scope["method"],
                scope["path"],
                label,
                exchange.status,
                None if key is None else key.name,
                None if model == "none" else model,
                elapsed,
                context,
                extra,
            )

    def _capped(self, receive: Receive, sink: list[bytes] | None = None) -> Receive:
        """Refuse bodies over the cap even when no content-length announced them (and keep the
        body in `sink` for the log line, when content is logged)."""
        seen = [0]
        limit = self.max_body_bytes

        async def wrapped() -> Message:
            message = await receive()
            if message["type"] == "http.request":
                if sink is not None:
                    sink.append(message.get("body", b""))
                seen[0] += len(message.get("body", b""))
                if seen[0] > limit:
                    raise _BodyTooLarge(f"Request body exceeds {limit} bytes.")
            return message

        return wrapped


def _text(chunks: list[bytes] | None) -> str | None:
    if chunks is None:
        return None
    return b"".join(chunks)[:CONTENT_BYTES].decode("utf-8", "replace")

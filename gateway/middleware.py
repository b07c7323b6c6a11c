"""Pure ASGI middleware (no BaseHTTPMiddleware: it breaks streaming and disconnect detection).

One pass per request: request id, bearer auth, body-size cap, and the request
counter and latency histogram.
"""

from __future__ import annotations

import hashlib
import logging
import re
import secrets
import time
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from gateway.error_handlers import error_response
from gateway.errors import GatewayError, InvalidRequest, Unauthorized
from gateway.ids import unique_hex
from gateway.metrics import Metrics

log = logging.getLogger(__name__)

_SAFE_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")
_OPEN_PATHS = frozenset({"/health", "/ready", "/metrics", "/ui", "/ui/", "/ui/dashboard"})
# The UI's pages and static files are open: the page asks for a key and sends it on its API calls.
_OPEN_PREFIXES = ("/ui/static/",)


class _BodyTooLarge(InvalidRequest):
    status_code = 413
    code = "request_too_large"


class GatewayMiddleware:
    def __init__(self, app: ASGIApp, *, metrics: Metrics, api_keys: list[str], max_body_bytes: int) -> None:
        self.app = app
        self.metrics = metrics
        self.key_digests = [hashlib.sha256(k.encode()).digest() for k in api_keys]
        self.max_body_bytes = max_body_bytes
        self._children: dict[tuple[str, str, int], tuple[Any, Any]] = {}

    def _authorized(self, headers: dict[bytes, bytes]) -> bool:
        if not self.key_digests:
            return True
        value = headers.get(b"authorization", b"").decode("latin-1")
        scheme, _, token = value.partition(" ")
        if scheme.lower() != "bearer" or not token:
            return False
        digest = hashlib.sha256(token.strip().encode()).digest()
        # compare against every key so timing does not reveal which one matched
        return sum(secrets.compare_digest(digest, d) for d in self.key_digests) > 0

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        headers = dict(scope["headers"])
        incoming = headers.get(b"x-request-id", b"").decode("latin-1")
        request_id = incoming if incoming and _SAFE_ID.match(incoming) else unique_hex()
        state: dict[str, Any] = scope.setdefault("state", {})
        state["request_id"] = request_id
        state["received_at"] = started
        status_holder = [500]
        path: str = scope["path"]

        started_response = [False]

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                started_response[0] = True
                status_holder[0] = message["status"]
                message.setdefault("headers", [])
                message["headers"] = [*message["headers"], (b"x-request-id", request_id.encode())]
            await send(message)

        try:
            if path not in _OPEN_PATHS and not path.startswith(_OPEN_PREFIXES) and not self._authorized(headers):
                await error_response(Unauthorized("Invalid or missing API key."), scope)(scope, receive, send_with_id)
                return
            declared = headers.get(b"content-length")
            if declared is not None and declared.isdigit() and int(declared) > self.max_body_bytes:
                too_large = _BodyTooLarge(f"Request body exceeds {self.max_body_bytes} bytes.")
                await error_response(too_large, scope)(scope, receive, send_with_id)
                return
            try:
                await self.app(scope, self._capped(receive), send_with_id)
            except Exception:
                # Caught here rather than by an exception handler: Starlette re-raises after a
                # handler for Exception answers, and uvicorn then drops the keep-alive connection.
                log.exception("unhandled error on %s", path)
                if started_response[0]:
                    return  # nothing more can be said once the response has begun
                await error_response(GatewayError("Internal server error."), scope)(scope, receive, send_with_id)
        finally:
            route = scope.get("route")
            label = getattr(route, "path", None) or "unmatched"
            context = state.get("context")  # the RequestContext; services.resolve names its model
            if context is not None:
                context.release()  # the model leases resolve took: the response is over
            model = context.model if context is not None and context.model is not None else "none"
            key = (label, model, status_holder[0])
            children = self._children.get(key)
            if children is None:  # labels() takes a lock and builds a tuple: once per label set only
                children = self._children[key] = (
                    self.metrics.requests.labels(label, model, str(status_holder[0])),
                    self.metrics.request_latency.labels(label, model),
                )
            children[0].inc()
            children[1].observe(time.perf_counter() - started)

    def _capped(self, receive: Receive) -> Receive:
        """Refuse bodies over the cap even when no content-length announced them."""
        seen = [0]
        limit = self.max_body_bytes

        async def wrapped() -> Message:
            message = await receive()
            if message["type"] == "http.request":
                seen[0] += len(message.get("body", b""))
                if seen[0] > limit:
                    raise _BodyTooLarge(f"Request body exceeds {limit} bytes.")
            return message

        return wrapped

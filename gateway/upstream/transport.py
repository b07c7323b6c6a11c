"""Pooled keep-alive HTTP to one upstream, on the gateway's own HTTP/1.1 client (upstream/http1.py).

Our client rather than aiohttp's by measurement (docs/benchmarks-upstream.md): aiohttp's per-call
machinery was most of the gateway's CPU per request in front of a fast upstream. (aiohttp had
replaced httpx, whose forwarder lost about a third of its throughput at concurrency 16 to pool
contention.) Redirects are never followed and proxy variables are ignored, so the configured URL
is the only place we connect to. Cookies are neither kept nor sent: one pool serves every client
of the gateway, so a cookie an upstream set while answering one client would otherwise go out
with the next client's calls.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import orjson

from gateway import tracing
from gateway.errors import GatewayError, InvalidRequest, UpstreamError
from gateway.logs import request_id_var
from gateway.upstream.http1 import Pool, Response
from gateway.upstream.retry import RETRY_STATUSES, RetryableFailure, parse_retry_after

log = logging.getLogger(__name__)

# What a call to an upstream can fail with on the way: the connection (refused, reset, closed
# early, a malformed answer: OSError and its ConnectionError family) or a timeout.
TRANSPORT_ERRORS = (OSError, asyncio.TimeoutError)
KEEPALIVE_SECONDS = 30.0  # an idle connection is dropped after this long (servers close theirs too)
ERROR_BODY_SECONDS = 5.0  # the most an error answer's body is waited for (its message goes to the log)


def _upstream_message(body: bytes) -> str:
    """The error text an upstream put in its body, whatever its shape (OpenAI or HF)."""
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError:
        return body[:300].decode("utf-8", "replace")
    error = data.get("error") if isinstance(data, dict) else None
    if isinstance(error, dict):
        error = error.get("message")
    if error is None and isinstance(data, dict):
        error = data.get("message") or data.get("detail")
    return str(error)[:300] if error is not None else ""


def status_failure(status: int, body: bytes, headers: Any, where: str) -> Exception:
    """The exception for a non-2xx upstream answer: retryable, the client's fault, or a gateway-side 502."""
    message = _upstream_message(body)
    if status in RETRY_STATUSES:
        kind = "status_429" if status == 429 else "status_5xx"
        return RetryableFailure(
            f"{where} answered {status}.",
            status=status,
            kind=kind,
            retry_after=parse_retry_after(headers.get("Retry-After")),
        )
    if status in (400, 413, 422):
        # The upstream refused this request's content: the client can fix it, so it learns why.
        error: GatewayError = InvalidRequest(f"{where} refused the request: {message}")
    else:
        # 401/403/404/500...: the gateway's configuration or the upstream is at fault; details go to the log.
        log.warning("%s answered %s: %s", where, status, message)
        error = UpstreamError(f"{where} failed with status {status}.")
    return error


def connection_failure(exc: BaseException, where: str) -> RetryableFailure:
    if isinstance(exc, asyncio.TimeoutError):
        return RetryableFailure(f"{where} timed out.", status=504, kind="timeout")
    return RetryableFailure(f"{where} could not be reached ({type(exc).__name__}).", status=502, kind="connect")


def _request_headers() -> dict[str, str] | None:
    """The request id (and the trace context) of the request this call serves, for the upstream's logs."""
    request_id = request_id_var.get()
    if request_id is None:
        return None
    headers = {"x-request-id": request_id}
    tracing.inject(headers)
    return headers


def _encoded(body: dict[str, Any], where: str) -> bytes:
    try:
        return orjson.dumps(body)
    except TypeError as exc:  # orjson.JSONEncodeError: a value the upstream's JSON API cannot carry
        raise InvalidRequest(f"{where} cannot be sent this request: {exc}.") from None


class Transport:
    """The HTTP calls to one upstream: JSON posted, the response handed back once its head is in
    and its status is 2xx (anything else is raised as the failure it is)."""

    def __init__(self, base_url: str, headers: dict[str, str], *, connect_timeout: float, max_connections: int) -> None:
        self.base_url = base_url
        self.headers = {"Content-Type": "application/json", **headers}
        self.connect_timeout = connect_timeout
        self.max_connections = max_connections
        self.pool: Pool | None = None

    async def open(self) -> None:
        self.pool = Pool(self.base_url, self.headers, limit=self.max_connections, keepalive=KEEPALIVE_SECONDS)

    async def close(self) -> None:
        if self.pool is not None:
            self.pool.close()
            self.pool = None

    async def fetch(self, path: str, body: dict[str, Any], *, timeout: float, where: str) -> tuple[Response, bytes]:
        """POST and read the whole 2xx answer, all within `timeout`: the response (status,
        headers, when its head arrived) and its body. The connection is back in the pool."""
        assert self.pool is not None, "transport not opened"
        data = _encoded(body, where)
        connect = min(self.connect_timeout, timeout)
        response: Response | None = None
        try:
            async with asyncio.timeout(timeout):
                response = await self.pool.request(
                    b"POST", path, data, headers=_request_headers(), connect_timeout=connect
                )
                payload = await response.read()
        except TRANSPORT_ERRORS as exc:
            if response is not None:
                response.close()
            if response is not None and response.status >= 300:
                raise status_failure(response.status, b"", response.headers, where) from None
            raise connection_failure(exc, where) from None
        except BaseException:
            if response is not None:
                response.close()
            raise
        response.release()
        if response.status >= 300:
            raise status_failure(response.status, payload, response.headers, where)
        return response, payload

    async def stream(self, path: str, body: dict[str, Any], *, idle: float, where: str) -> Response:
        """POST and return the response once its head is in and its status is 2xx, to be read line by
        line: `idle` bounds the wait for the head and then each read (the time between events),
        not the whole response. The caller releases or closes the response."""
        assert self.pool is not None, "transport not opened"
        data = _encoded(body, where)
        loop = asyncio.get_running_loop()
        connect = min(self.connect_timeout, idle)
        try:
            async with asyncio.timeout(idle):
                response = await self.pool.request(
                    b"POST", path, data, headers=_request_headers(), connect_timeout=connect
                )
        except TRANSPORT_ERRORS as exc:
            raise connection_failure(exc, where) from None
        response.idle = idle
        if response.status >= 300:
            try:
                payload = await response.read(loop.time() + min(idle, ERROR_BODY_SECONDS))
            except TRANSPORT_ERRORS:
                payload = b""
            finally:
                response.release()
            raise status_failure(response.status, payload, response.headers, where)
        return response

    async def alive(self, path: str, timeout: float, body: dict[str, Any] | None = None) -> bool:
        """Whether the upstream answers a GET on `path` (a POST of `body` if given) with anything
        but an overload or server error."""
        assert self.pool is not None
        method, data = (b"GET", None) if body is None else (b"POST", orjson.dumps(body))
        try:
            async with asyncio.timeout(timeout):
                response = await self.pool.request(method, path, data, connect_timeout=timeout)
                try:
                    await response.read()
                finally:
                    response.release()
        except TRANSPORT_ERRORS:
            return False
        return response.status < 500 and response.status != 429

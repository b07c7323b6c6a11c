"""Pooled keep-alive HTTP to one upstream, on aiohttp.

aiohttp rather than httpx by measurement (docs/benchmarks-upstream.md): an httpx
forwarder loses about a third of its throughput at concurrency 16 to pool
contention, an aiohttp one does not. Redirects are never followed and proxy
variables are ignored, so the configured URL is the only place we connect to.
Cookies are neither kept nor sent: one session serves every client of the
gateway, so a cookie an upstream set while answering one client would otherwise
go out with the next client's calls (and the jar's per-call work is saved).
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import aiohttp
import orjson
from yarl import URL

from gateway import tracing
from gateway.errors import GatewayError, InvalidRequest, UpstreamError
from gateway.logs import request_id_var
from gateway.upstream.retry import RETRY_STATUSES, RetryableFailure, parse_retry_after

log = logging.getLogger(__name__)


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


class Transport:
    def __init__(self, base_url: str, headers: dict[str, str], *, connect_timeout: float, max_connections: int) -> None:
        self.base_url = base_url
        self.headers = {"Content-Type": "application/json", **headers}
        self.connect_timeout = connect_timeout
        self.max_connections = max_connections
        self.session: aiohttp.ClientSession | None = None
        self._limits: dict[tuple[float, bool], aiohttp.ClientTimeout] = {}
        self._urls: dict[str, URL] = {}  # parsed once per path, not on every call

    def url(self, path: str) -> URL:
        url = self._urls.get(path)
        if url is None:
            url = self._urls[path] = URL(self.base_url + path)
        return url

    def _timeout(self, timeout: float, stream: bool) -> aiohttp.ClientTimeout:
        connect = min(self.connect_timeout, timeout)
        if stream:
            return aiohttp.ClientTimeout(total=None, connect=connect, sock_read=timeout)
        return aiohttp.ClientTimeout(total=timeout, connect=connect)

    def remember_timeout(self, timeout: float) -> None:
        """Build the full per-try timeouts once; only a retry near the deadline needs a fresh one."""
        self._limits = {(timeout, s): self._timeout(timeout, s) for s in (False, True)}

    async def open(self) -> None:
        connector = aiohttp.TCPConnector(limit=self.max_connections, keepalive_timeout=30, ttl_dns_cache=300)
        self.session = aiohttp.ClientSession(
            connector=connector,
            headers=self.headers,
            trust_env=False,
            auto_decompress=True,
            cookie_jar=aiohttp.DummyCookieJar(),
        )

    async def close(self) -> None:
        if self.session is not None:
            await self.session.close()
            self.session = None

    async def post(
        self, path: str, body: dict[str, Any], *, timeout: float, stream: bool, where: str
    ) -> aiohttp.ClientResponse:
        """POST and return the response once its headers are in and its status is 2xx.

        For `stream`, `timeout` bounds each read (time to first byte and every gap
        after it) instead of the whole response. The caller closes the response.
        """
        assert self.session is not None, "transport not opened"
        limits = self._limits.get((timeout, stream))
        if limits is None:
            limits = self._timeout(timeout, stream)
        try:
            data = orjson.dumps(body)
        except TypeError as exc:  # orjson.JSONEncodeError: a value the upstream's JSON API cannot carry
            raise InvalidRequest(f"{where} cannot be sent this request: {exc}.") from None
        try:
            response = await self.session.post(
                self.url(path), data=data, timeout=limits, allow_redirects=False, headers=_request_headers()
            )
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as exc:
            raise connection_failure(exc, where) from None
        if response.status >= 300:
            try:
                payload = await response.read()
            except (aiohttp.ClientError, asyncio.TimeoutError, OSError):
                payload = b""
            finally:
                response.release()
            raise status_failure(response.status, payload, response.headers, where)
        return response

    async def alive(self, path: str, timeout: float, body: dict[str, Any] | None = None) -> bool:
        """Whether the upstream answers a GET on `path` (a POST of `body` if given) with anything
        but an overload or server error."""
        assert self.session is not None
        method = "GET" if body is None else "POST"
        data = None if body is None else orjson.dumps(body)
        try:
            async with self.session.request(
                method,
                self.url(path),
                data=data,
                timeout=aiohttp.ClientTimeout(total=timeout),
                allow_redirects=False,
            ) as response:
                return response.status < 500 and response.status != 429
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError):
            return False

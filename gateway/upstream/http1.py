"""A small HTTP/1.1 client for the upstream calls: keep-alive connections to one origin.

Why not aiohttp's client: on the proxy hot path (a chat request relayed to a fast upstream) its
per-call machinery (URL and header merging, cookie and redirect handling, tracing hooks, request
and response objects, a timer per call) was about 140 µs of the gateway's ~220 µs of CPU per
request, measured in process with bench/upstream_cpu.py; this client, which does only what the
gateway needs (POST and GET to configured upstreams, JSON in, JSON or SSE out), does the same
call in about a third of that. The wire parsing is httptools (llhttp, the parser uvicorn serves
with), so what is ours is the connection pool and the framing around it.

What it does: one origin (scheme, host, port) per `Pool`; at most `limit` connections, callers
beyond wait in turn; idle connections reused newest first and dropped when the server closed
them or after `keepalive` seconds; TLS with the default certificate checks; Content-Length,
chunked and close-delimited bodies; gzip/deflate bodies decoded though identity is asked for;
a response read whole (`read`) or line by line (`readline`, for SSE) with the reads bounded by
the caller's deadline or idle timeout. A connection goes back to the pool only after a complete
response that allows keep-alive; anything else (a cancelled call, a timeout, a body left unread)
closes it, so a half-read answer can never be taken for the next one.
"""

from __future__ import annotations

import asyncio
import base64
import collections
import ssl
import time
import zlib
from typing import Any, cast
from urllib.parse import unquote, urlsplit

import httptools

READ_LIMIT = 256 * 1024  # bytes buffered from a stream before reading from the socket pauses


class ConnectionClosed(ConnectionError):
    """The upstream closed the connection (or it broke) before the response was complete."""


class Origin:
    """Where a base URL points: scheme, host, port, the path prefix, the Host header, TLS."""

    def __init__(self, base_url: str) -> None:
        parts = urlsplit(base_url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"not an http(s) URL: {base_url!r}")
        self.tls = parts.scheme == "https"
        self.host = parts.hostname
        self.port = parts.port or (443 if self.tls else 80)
        self.prefix = parts.path.rstrip("/")
        user = unquote(parts.username or "")
        self.userinfo = f"{user}:{unquote(parts.password or '')}" if parts.username is not None else ""
        self.query = parts.query
        host = f"[{self.host}]" if ":" in self.host else self.host
        default = self.port == (443 if self.tls else 80)
        self.host_header = (host if default else f"{host}:{self.port}").encode("idna")

    def target(self, path: str) -> bytes:
        """The request target for `path` under the base URL (keeping the base URL's query)."""
        target = (self.prefix + path) or "/"
        if self.query:
            target += ("&" if "?" in target else "?") + self.query
        return target.encode("utf-8")


class Headers(dict[str, str]):
    """Response headers by lower-cased name; looked up by any case (`get("Retry-After")`)."""

    def get(self, name: str, default: Any = None) -> Any:
        return super().get(name.lower(), default)

    def __getitem__(self, name: str) -> str:
        return super().__getitem__(name.lower())

    def __contains__(self, name: object) -> bool:
        return super().__contains__(name.lower() if isinstance(name, str) else name)


class Response:
    """One response: status and headers (names lower-cased) once the head is in; the body read
    whole or by lines. `release` hands the connection back when the response was read to its end;
    `close` drops it."""

    __slots__ = ("status", "headers", "head_at", "idle", "_conn", "_decoder", "_pending")

    def __init__(self, status: int, headers: Headers, conn: _Connection, head_at: float) -> None:
        self.status = status
        self.headers = headers
        self.head_at = head_at  # loop time when the head was in (time to first byte)
        self.idle: float | None = None  # the most `readline` waits for more data (None: no bound)
        self._conn = conn
        self._pending = b""  # decoded body not yet returned by readline
        encoding = headers.get("content-encoding", "identity").lower()
        self._decoder: Any = None
        if encoding in ("gzip", "x-gzip"):
            self._decoder = zlib.decompressobj(16 + zlib.MAX_WBITS)
        elif encoding == "deflate":
            self._decoder = zlib.decompressobj()

    async def read(self, deadline: float | None = None) -> bytes:
        """The whole body, by `deadline` (loop time) if given."""
        conn = self._conn
        if deadline is None:
            await conn.complete()
        else:
            async with asyncio.timeout_at(deadline):
                await conn.complete()
        return self._decoded(conn.take(), final=True)

    async def readline(self) -> bytes:
        """The next line, with its newline (b"" at the end of the body); each wait for more data
        bounded by `idle` seconds."""
        conn = self._conn
        idle = self.idle
        while True:
            raw = conn.take()
            if raw:
                self._pending += self._decoded(raw, final=False)
            end = self._pending.find(b"\n")
            if end >= 0:
                line, self._pending = self._pending[: end + 1], self._pending[end + 1 :]
                return line
            if conn.finished:
                rest, self._pending = self._pending + self._decoded(b"", final=True), b""
                return rest
            if idle is None:
                await conn.more()
            else:
                async with asyncio.timeout(idle):
                    await conn.more()

    def _decoded(self, data: bytes, *, final: bool) -> bytes:
        decoder = self._decoder
        if decoder is None:
            return data
        try:
            out: bytes = decoder.decompress(data)
            return out + decoder.flush() if final else out
        except zlib.error as exc:
            raise ConnectionClosed(f"the upstream sent a body that does not decode ({exc})") from None

    def release(self) -> None:
        self._conn.release()

    def close(self) -> None:
        self._conn.close()


class _Connection(asyncio.Protocol):
    """One socket to the origin, parsing one response at a time with httptools."""

    def __init__(self, pool: Pool) -> None:
        self.pool = pool
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.closed = False
        self.counted = True  # against the pool's limit, until closed
        self.idle_since = 0.0
        self.finished = False  # the current response's body is complete
        self._in_use = False
        self._head: asyncio.Future[Response] | None = None  # set until the head is in
        self._waiter: asyncio.Future[None] | None = None  # more body, or its end
        self._headers = Headers()
        self._chunks: list[bytes] = []
        self._buffered = 0
        self._paused = False
        self._keep_alive = False  # whether the server keeps the connection after this response
        self._error: BaseException | None = None

    # asyncio.Protocol -------------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass, same methods

    def data_received(self, data: bytes) -> None:
        if not self._in_use or self.finished:  # bytes nobody asked for: the connection cannot be trusted
            self._fail(ConnectionClosed("the upstream sent bytes after its answer"))
            self.close()
            return
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self._fail(ConnectionClosed("the upstream switched protocols"))
        except httptools.HttpParserError as exc:
            self._fail(ConnectionClosed(f"the upstream sent a malformed HTTP response ({exc})"))

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self._in_use and not self.finished:
            if self._head is None and self._close_delimited():
                self._end()  # a body with neither length nor chunking ends with the connection
            else:
                self._fail(ConnectionClosed("the upstream closed the connection"))
        self.pool.forget(self)

    # httptools callbacks ------------------------------------------------------------------------
    def on_header(self, name: bytes, value: bytes) -> None:
        self._headers[name.decode("latin-1").lower()] = value.decode("latin-1")

    def on_headers_complete(self) -> None:
        status = self.parser.get_status_code()
        if status < 200:  # an informational answer (100, 103): the real one follows
            self._headers = Headers()
            return
        self._keep_alive = self.parser.should_keep_alive()  # llhttp answers this only here
        head, self._head = self._head, None
        if head is not None and not head.done():
            head.set_result(Response(status, self._headers, self, head.get_loop().time()))

    def on_body(self, body: bytes) -> None:
        self._chunks.append(body)
        self._buffered += len(body)
        if self._buffered > READ_LIMIT and not self._paused and self.transport is not None:
            self._paused = True  # the reader is behind: stop reading the socket until it catches up
            self.transport.pause_reading()
        self._wake()

    def on_message_complete(self) -> None:
        if self._head is None:  # not the end of an informational answer
            self._end()

    # one exchange -------------------------------------------------------------------------------
    async def send(self, data: bytes) -> Response:
        assert self.transport is not None
        if self.closed:
            raise ConnectionClosed("the upstream closed the connection")
        self._in_use = True
        self.finished = False
        self._keep_alive = False
        self._headers = Headers()
        self._chunks = []
        self._buffered = 0
        self._error = None
        self._head = asyncio.get_running_loop().create_future()
        self.transport.write(data)
        return await self._head

    async def complete(self) -> None:
        """Wait for the end of the body (all of it buffered), or a failure."""
        while not self.finished:
            await self._wait()
        if self._error is not None:
            raise self._error

    async def more(self) -> None:
        """Wait for more of the body than is buffered, its end, or a failure."""
        if not self.finished and not self._chunks:
            await self._wait()
        if self._error is not None:
            raise self._error

    async def _wait(self) -> None:
        if self._error is not None:
            raise self._error
        if self._paused and self.transport is not None:
            self._paused = False
            self.transport.resume_reading()
        self._waiter = asyncio.get_running_loop().create_future()
        try:
            await self._waiter
        finally:
            self._waiter = None

    def take(self) -> bytes:
        """The body buffered so far (and it is no longer buffered)."""
        chunks = self._chunks
        if not chunks:
            return b""
        self._chunks = []
        self._buffered = 0
        return chunks[0] if len(chunks) == 1 else b"".join(chunks)

    def release(self) -> None:
        """Back to the pool if the response was read to its end and the server keeps the connection."""
        if not self._in_use:
            return
        self._in_use = False
        if self.finished and not self._chunks and not self.closed and self._keep_alive:
            self.pool.put_back(self)
        else:
            self.close()

    def close(self) -> None:
        self._in_use = False
        if self.transport is not None and not self.closed:
            self.transport.close()
        self.closed = True
        self.pool.forget(self)

    # internals ----------------------------------------------------------------------------------
    def _close_delimited(self) -> bool:
        h = self._headers
        return "content-length" not in h and "chunked" not in h.get("transfer-encoding", "").lower()

    def _end(self) -> None:
        self.finished = True
        self._wake()

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _fail(self, error: BaseException) -> None:
        self._error = error
        head, self._head = self._head, None
        if head is not None and not head.done():
            head.set_exception(error)
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_exception(error)
        if self.transport is not None and not self.closed:
            self.transport.close()


class Pool:
    """Keep-alive connections to one origin, at most `limit` at a time."""

    def __init__(self, base_url: str, headers: dict[str, str], *, limit: int = 100, keepalive: float = 30.0) -> None:
        self.origin = Origin(base_url)
        self.limit = limit
        self.keepalive = keepalive
        # Fixed headers of every request, pre-encoded; Content-Length and per-call ones are added.
        fixed = {"host": self.origin.host_header.decode(), "accept-encoding": "identity", **_lower(headers)}
        if self.origin.userinfo and "authorization" not in fixed:  # https://user:secret@host/: Basic auth
            fixed["authorization"] = "Basic " + base64.b64encode(self.origin.userinfo.encode()).decode()
        self._fixed = b"".join(f"{k}: {v}\r\n".encode("latin-1") for k, v in fixed.items())
        self._idle: list[_Connection] = []
        self._open = 0  # connections open or being opened
        self._waiters: collections.deque[asyncio.Future[None]] = collections.deque()
        self._ssl: ssl.SSLContext | None = ssl.create_default_context() if self.origin.tls else None
        self._targets: dict[str, bytes] = {}
        self._closed = False

    async def request(
        self,
        method: bytes,
        path: str,
        body: bytes | None,
        *,
        headers: dict[str, str] | None = None,
        connect_timeout: float,
    ) -> Response:
        """Send one request and return its response once the head is in. The caller bounds the
        whole call (asyncio.timeout); a call cut short closes its connection."""
        target = self._targets.get(path)
        if target is None:
            target = self._targets[path] = self.origin.target(path)
        head = [method, b" ", target, b" HTTP/1.1\r\n", self._fixed]
        if headers:
            head.append(b"".join(f"{k}: {v}\r\n".encode("latin-1") for k, v in headers.items()))
        if body is not None:
            head.append(b"content-length: %d\r\n\r\n" % len(body))
            head.append(body)
        else:
            head.append(b"\r\n")
        data = b"".join(head)
        conn = await self._acquire(connect_timeout)
        try:
            return await conn.send(data)
        except BaseException:
            conn.close()
            raise

    async def _acquire(self, connect_timeout: float) -> _Connection:
        now = time.monotonic()
        while self._idle:
            conn = self._idle.pop()
            if conn.closed:
                continue
            if now - conn.idle_since > self.keepalive:
                conn.close()
                continue
            return conn
        while self._open >= self.limit:
            waiter = asyncio.get_running_loop().create_future()
            self._waiters.append(waiter)
            try:
                await waiter
            except BaseException:
                if waiter.done() and not waiter.cancelled():
                    self._wake_one()  # it was our turn: pass it on
                raise
            finally:
                if waiter in self._waiters:
                    self._waiters.remove(waiter)
            while self._idle:  # a connection came back while we waited
                conn = self._idle.pop()
                if not conn.closed:
                    return conn
        self._open += 1
        try:
            async with asyncio.timeout(connect_timeout):
                _, conn = await asyncio.get_running_loop().create_connection(
                    lambda: _Connection(self),
                    self.origin.host,
                    self.origin.port,
                    ssl=self._ssl,
                    server_hostname=self.origin.host if self._ssl else None,
                )
        except BaseException:
            self._open -= 1
            self._wake_one()
            raise
        return conn

    def put_back(self, conn: _Connection) -> None:
        if self._closed:
            conn.close()
            return
        conn.idle_since = time.monotonic()
        self._idle.append(conn)
        self._wake_one()

    def forget(self, conn: _Connection) -> None:
        """A connection closed: it no longer counts against the limit."""
        if conn.counted:
            conn.counted = False
            self._open -= 1
            if conn in self._idle:
                self._idle.remove(conn)
            self._wake_one()

    def _wake_one(self) -> None:
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return

    def close(self) -> None:
        """Close the idle connections; those in use close when their response is done."""
        self._closed = True
        for conn in list(self._idle):
            conn.close()
        self._idle.clear()


def _lower(headers: dict[str, str]) -> dict[str, str]:
    return {k.lower(): v for k, v in headers.items()}

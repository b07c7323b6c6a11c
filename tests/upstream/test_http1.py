"""The gateway's upstream HTTP/1.1 client (gateway/upstream/http1.py) against raw servers on
loopback that write exactly the bytes each test scripts: body framings, keep-alive and its
limits, connections the server drops, answers cut short or malformed, gzip, TLS, the pool's
connection limit, and a call cancelled half-way (its connection must never be reused)."""

from __future__ import annotations

import asyncio
import gzip
import ssl
from collections.abc import Awaitable, Callable

import pytest
import trustme

from gateway.upstream import http1
from gateway.upstream.http1 import ConnectionClosed, Origin, Pool

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter, int], Awaitable[bool]]


class RawServer:
    """Calls `handler(reader, writer, connection_number)` for each request head it reads on a
    connection; the handler answers with whatever bytes it likes and says whether to go on."""

    def __init__(self, handler: Handler, tls: ssl.SSLContext | None = None) -> None:
        self.handler = handler
        self.tls = tls
        self.connections = 0
        self.requests: list[bytes] = []
        self.server: asyncio.Server | None = None

    async def __aenter__(self) -> RawServer:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0, ssl=self.tls)
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self.server is not None
        self.server.close()

    @property
    def url(self) -> str:
        assert self.server is not None
        port = self.server.sockets[0].getsockname()[1]
        return f"{'https' if self.tls else 'http'}://{'localhost' if self.tls else '127.0.0.1'}:{port}/v1"

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        number = self.connections
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = next(
                    (
                        int(line.split(b":")[1])
                        for line in head.split(b"\r\n")
                        if line.lower().startswith(b"content-length")
                    ),
                    0,
                )
                self.requests.append(head + await reader.readexactly(length))
                if not await self.handler(reader, writer, number):
                    break
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()


def answer(body: bytes, *headers: bytes, status: bytes = b"200 OK") -> bytes:
    head = b"HTTP/1.1 " + status + b"\r\ncontent-length: %d\r\n" % len(body)
    return head + b"".join(h + b"\r\n" for h in headers) + b"\r\n" + body


def replying(*responses: bytes, keep: bool = True) -> Handler:
    """Answers the n-th request with responses[n] (the last one from then on)."""
    count = [0]

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, number: int) -> bool:
        writer.write(responses[min(count[0], len(responses) - 1)])
        count[0] += 1
        await writer.drain()
        return keep

    return handler


async def fetch(pool: Pool, path: str = "/chat", body: bytes | None = b"{}") -> tuple[int, dict[str, str], bytes]:
    response = await pool.request(b"POST" if body is not None else b"GET", path, body, connect_timeout=2)
    data = await response.read(asyncio.get_running_loop().time() + 5)
    response.release()
    return response.status, dict(response.headers), data


def test_keep_alive_reuses_one_connection_and_sends_what_it_should() -> None:
    async def run() -> None:
        async with RawServer(replying(answer(b'{"ok":1}', b"content-type: application/json"))) as server:
            pool = Pool(server.url + "?api-version=2", {"Authorization": "Bearer up"})
            for _ in range(5):
                status, headers, data = await fetch(pool, "/chat/completions", b'{"a":1}')
                assert (status, data, headers["content-type"]) == (200, b'{"ok":1}', "application/json")
            pool.close()
        assert server.connections == 1
        first = server.requests[0]
        assert first.startswith(b"POST /v1/chat/completions?api-version=2 HTTP/1.1\r\n")
        assert b"\r\nauthorization: Bearer up\r\n" in first and b"\r\ncontent-length: 7\r\n" in first
        assert b"\r\naccept-encoding: identity\r\n" in first and first.endswith(b'\r\n\r\n{"a":1}')

    asyncio.run(run())


@pytest.mark.parametrize(
    "raw",
    [
        b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n4\r\nHell\r\n7\r\no, you!\r\n0\r\n\r\n",
        answer(b"Hello, you!"),
        b"HTTP/1.1 100 Continue\r\n\r\n" + answer(b"Hello, you!"),
    ],
    ids=["chunked", "length", "after-100"],
)
def test_body_framings(raw: bytes) -> None:
    async def run() -> None:
        async with RawServer(replying(raw)) as server:
            pool = Pool(server.url, {})
            assert (await fetch(pool))[::2] == (200, b"Hello, you!")
            assert (await fetch(pool))[::2] == (200, b"Hello, you!")
        assert server.connections == 1  # and the connection was fit for the next one

    asyncio.run(run())


def test_close_delimited_body_and_connection_close() -> None:
    async def run() -> None:
        async with RawServer(replying(b"HTTP/1.1 200 OK\r\n\r\nuntil the end", keep=False)) as server:
            pool = Pool(server.url, {})
            assert (await fetch(pool))[::2] == (200, b"until the end")
            assert (await fetch(pool))[::2] == (200, b"until the end")
        assert server.connections == 2
        async with RawServer(replying(answer(b"x", b"connection: close"), keep=True)) as server:
            pool = Pool(server.url, {})
            await fetch(pool)
            await fetch(pool)
        assert server.connections == 2  # the server said close: never reused

    asyncio.run(run())


def test_a_connection_the_server_dropped_while_idle_is_not_used() -> None:
    async def run() -> None:
        async with RawServer(replying(answer(b"ok"), keep=False)) as server:  # answers, then hangs up
            pool = Pool(server.url, {})
            for _ in range(3):
                assert (await fetch(pool))[::2] == (200, b"ok")
                await asyncio.sleep(0.05)  # the close reaches the client
        assert server.connections == 3

    asyncio.run(run())


@pytest.mark.parametrize(
    "raw",
    [b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\nshort", b"NOT HTTP AT ALL\r\n\r\n", b""],
    ids=["cut-short", "malformed", "nothing"],
)
def test_broken_answers_raise_connection_closed(raw: bytes) -> None:
    async def run() -> None:
        async with RawServer(replying(raw, keep=False)) as server:
            pool = Pool(server.url, {})
            with pytest.raises(ConnectionClosed):
                await fetch(pool)
            await asyncio.sleep(0.01)  # the close is reported on the next turns of the loop
            assert pool._open == 0 and not pool._idle  # nothing broken is kept

    asyncio.run(run())


def test_gzip_bodies_are_decoded_whole_and_by_line() -> None:
    text = b"".join(b'data: {"n": %d}\n\n' % i for i in range(300))
    packed = gzip.compress(text)

    async def run() -> None:
        async with RawServer(replying(answer(packed, b"content-encoding: gzip"))) as server:
            pool = Pool(server.url, {})
            assert (await fetch(pool))[2] == text
            response = await pool.request(b"POST", "/s", b"{}", connect_timeout=2)
            response.idle = 2
            lines = []
            while line := await response.readline():
                lines.append(line)
            response.release()
            assert b"".join(lines) == text and lines[0] == b'data: {"n": 0}\n' and len(lines) == 600

    asyncio.run(run())


def test_lines_longer_than_the_read_buffer_and_split_anywhere() -> None:
    long = b"x" * (3 * http1.READ_LIMIT)

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, number: int) -> bool:
        body = b"a\nbc\n" + long + b"\nlast"
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n" % len(body))
        for i in range(0, len(body), 3001):  # odd pieces, so lines split across reads
            writer.write(body[i : i + 3001])
            await writer.drain()
        return True

    async def run() -> None:
        async with RawServer(handler) as server:
            pool = Pool(server.url, {})
            response = await pool.request(b"GET", "/s", None, connect_timeout=2)
            response.idle = 5
            got = [await response.readline() for _ in range(5)]
            response.release()
            assert got == [b"a\n", b"bc\n", long + b"\n", b"last", b""]
            assert (await fetch(pool, body=None))[0] == 200  # and the connection was reusable

    asyncio.run(run())


def test_a_call_cancelled_half_way_never_leaves_its_connection_for_the_next() -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, number: int) -> bool:
        if number == 1:  # the head and half the body, then nothing
            writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\nhalf")
            await writer.drain()
            await asyncio.sleep(10)
            return False
        writer.write(answer(b"whole"))
        return True

    async def run() -> None:
        async with RawServer(handler) as server:
            pool = Pool(server.url, {}, limit=1)
            response = await pool.request(b"GET", "/", None, connect_timeout=2)
            with pytest.raises(TimeoutError):
                await response.read(asyncio.get_running_loop().time() + 0.2)
            response.release()  # as a careless caller would: half-read, so it is closed, not pooled
            assert (await fetch(pool))[::2] == (200, b"whole")  # a new connection, despite limit=1
            assert server.connections == 2

    asyncio.run(run())


def test_the_pool_holds_at_most_its_limit_and_everyone_gets_an_answer() -> None:
    open_now, most = 0, 0

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, number: int) -> bool:
        nonlocal open_now, most
        open_now += 1
        most = max(most, open_now)
        await asyncio.sleep(0.02)
        writer.write(answer(b"%d" % number))
        await writer.drain()
        open_now -= 1
        return True

    async def run() -> None:
        async with RawServer(handler) as server:
            pool = Pool(server.url, {}, limit=3)
            results = await asyncio.gather(*(fetch(pool) for _ in range(20)))
            assert [r[0] for r in results] == [200] * 20
            assert server.connections == 3 and most == 3
            # a waiter that gives up does not lose anyone's turn
            waiting = [asyncio.ensure_future(fetch(pool)) for _ in range(6)]
            await asyncio.sleep(0.005)
            waiting[4].cancel()
            done = await asyncio.gather(*waiting, return_exceptions=True)
            assert sum(isinstance(d, tuple) for d in done) == 5
            assert pool._open <= 3

    asyncio.run(run())


def test_tls_with_certificate_checks() -> None:
    ca = trustme.CA()
    server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("localhost").configure_cert(server_context)

    async def run() -> None:
        async with RawServer(replying(answer(b"secret")), tls=server_context) as server:
            pool = Pool(server.url, {})
            with pytest.raises(ssl.SSLCertVerificationError):  # not a CA this machine trusts
                await fetch(pool)
            trusting = Pool(server.url, {})
            assert trusting._ssl is not None
            ca.configure_trust(trusting._ssl)
            assert (await fetch(trusting))[::2] == (200, b"secret")

    asyncio.run(run())


def test_origin_parsing() -> None:
    o = Origin("https://api.example.com/openai/v1")
    assert (o.tls, o.host, o.port, o.host_header, o.target("/chat")) == (
        True,
        "api.example.com",
        443,
        b"api.example.com",
        b"/openai/v1/chat",
    )
    o = Origin("http://[::1]:8080")
    assert (o.host, o.port, o.host_header, o.target("")) == ("::1", 8080, b"[::1]:8080", b"/")
    assert Origin("http://h:80/x?k=v").target("/y?z=1") == b"/x/y?z=1&k=v"
    with pytest.raises(ValueError):
        Origin("ftp://h/")


def test_credentials_in_the_url_become_basic_auth() -> None:
    async def run() -> None:
        async with RawServer(replying(answer(b"ok"))) as server:
            url = server.url.replace("http://", "http://us%40er:p%3Ass@")
            await fetch(Pool(url, {}))
            await fetch(Pool(url, {"Authorization": "Bearer configured"}))  # configured headers win
        first, second = server.requests
        assert b"\r\nauthorization: Basic dXNAZXI6cDpzcw==\r\n" in first  # base64 of "us@er:p:ss"
        assert b"\r\nauthorization: Bearer configured\r\n" in second and b"Basic" not in second
        assert b"@" not in first.split(b"\r\n")[1]  # not in the Host header

    asyncio.run(run())

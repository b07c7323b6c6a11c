"""The upstream hot path's shortcuts keep its behaviour: the routes dispatched past the framework
(routes/common/direct.py) answer as routed ones (envelopes, metrics labels, request ids, methods), and
a client that leaves a non-streaming request still cancels it (services/streams.until_disconnect)."""

from __future__ import annotations

import asyncio
import time

import httpx
import openai
import pytest

from gateway.context import RequestContext
from gateway.routes.common.direct import DirectRoutes
from gateway.services import streams
from gateway.services.streams import LISTEN_AFTER, until_disconnect
from tests.upstream.conftest import front, sdk, upstream

CHAT = [{"role": "user", "content": "hi"}]


def serve(url: str):
    return front([{"name": "m", "task": "text-generation", "backend": upstream(url)}])


def _direct_table(app) -> dict:
    layer = app.middleware_stack
    while layer is not None and not isinstance(layer, DirectRoutes):
        layer = getattr(layer, "app", None)
    assert layer is not None, "DirectRoutes is not in the middleware stack"
    table = layer._table or layer._build()
    return {key: route for key, (route, _) in table.items()}


def test_chat_goes_direct_and_answers_like_a_routed_request(fault) -> None:
    with serve(f"{fault.url}/v1") as gw:
        reply = sdk(gw).chat.completions.with_raw_response.create(model="m", messages=CHAT, max_tokens=5)
        assert reply.headers["x-request-id"]
        assert reply.parse().choices[0].message.content == "Hello from the upstream"
        table = _direct_table(gw.app)
        metrics = httpx.get(f"{gw.url}/metrics").text
    assert ("POST", "/v1/chat/completions") in table
    assert not any("{" in path for _, path in table)  # only fixed paths skip the router
    # the route still labels the request's metrics, as when the router chose it
    assert 'route="/v1/chat/completions",status="200"' in metrics.replace('model="m",', "")


@pytest.mark.parametrize(
    ("body", "param"),
    [
        (b'{"model": "m", "messages": [', None),  # not JSON
        (b'{"model": "m", "messages": "hi"}', "messages"),  # wrong type
        (b'{"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": "x"}', "max_tokens"),
    ],
)
def test_bad_bodies_get_openai_400s(fault, body: bytes, param: str | None) -> None:
    with serve(f"{fault.url}/v1") as gw:
        r = httpx.post(f"{gw.url}/v1/chat/completions", content=body, headers={"content-type": "application/json"})
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["type"] == "invalid_request_error"
    if param is not None:
        assert param in (error.get("param") or "") + error["message"]
    assert fault.hits.get("/v1/chat/completions", 0) == 0  # nothing went upstream


def test_unknown_model_and_upstream_errors_keep_their_envelopes(fault) -> None:
    fault.queue("/v1/chat/completions", "400")
    with serve(f"{fault.url}/v1") as gw:
        client = sdk(gw)
        with pytest.raises(openai.NotFoundError) as missing:
            client.chat.completions.create(model="nope", messages=CHAT)
        with pytest.raises(openai.BadRequestError) as refused:
            client.chat.completions.create(model="m", messages=CHAT)
    assert missing.value.body["code"] == "model_not_found"
    assert "refused the request" in refused.value.message


def test_other_methods_still_reach_the_router(fault) -> None:
    with serve(f"{fault.url}/v1") as gw:
        r = httpx.get(f"{gw.url}/v1/chat/completions")
        models = httpx.get(f"{gw.url}/v1/models")
    assert r.status_code == 405
    assert "error" in r.json()
    assert models.status_code == 200 and models.json()["data"][0]["id"] == "m"


def test_a_client_gone_mid_request_cancels_the_upstream_call(fault) -> None:
    """Non-streaming: the disconnect listener (started once the work has run LISTEN_AFTER) cancels
    the request, which drops its upstream connection instead of waiting on it."""
    fault.queue("/v1/chat/completions", "hang")  # answers only once the gateway hangs up
    spec = upstream(f"{fault.url}/v1", timeouts={"per_try": 30.0, "total": 60.0})
    with front([{"name": "m", "task": "text-generation", "backend": spec}]) as gw:

        async def leave_once_forwarded() -> None:
            async with httpx.AsyncClient(timeout=60) as client:
                call = asyncio.ensure_future(
                    client.post(f"{gw.url}/v1/chat/completions", json={"model": "m", "messages": CHAT})
                )
                deadline = time.monotonic() + 20
                while fault.hits["/v1/chat/completions"] == 0:  # the gateway is now waiting on the upstream
                    assert not call.done() and time.monotonic() < deadline
                    await asyncio.sleep(0.02)
                call.cancel()  # closes the client's connection mid-request
                with pytest.raises(asyncio.CancelledError):
                    await call

        asyncio.run(leave_once_forwarded())
        # Uncancelled, the gateway would hold the upstream connection until its 30 s per-try timeout.
        assert wait_until(lambda: fault.open_connections() == 0 and len(fault.hung_up) == 1, timeout=10)
        assert fault.hits["/v1/chat/completions"] == 1


def wait_until(condition, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.02)
    return bool(condition())


def _context(wait_disconnect) -> RequestContext:
    return RequestContext(request_id="r", received_at=time.perf_counter(), wait_disconnect=wait_disconnect)


def test_quick_work_starts_no_listener_and_slow_work_is_cancelled_on_disconnect() -> None:
    async def scenario() -> tuple[int, float]:
        calls = 0

        async def gone() -> dict[str, str]:
            nonlocal calls
            calls += 1
            return {"type": "http.disconnect"}  # the client has already left

        assert await until_disconnect(_context(gone), asyncio.sleep(0, result=7)) == 7
        quick_calls = calls
        began = time.perf_counter()
        with pytest.raises(asyncio.CancelledError):
            await asyncio.wait_for(until_disconnect(_context(gone), asyncio.sleep(5)), 2)
        return quick_calls, time.perf_counter() - began

    quick_calls, waited = asyncio.run(scenario())
    assert quick_calls == 0  # work done before LISTEN_AFTER never listened
    assert LISTEN_AFTER <= waited < 1.0  # the slow work was cancelled once the listener heard it


def test_one_shared_timer_cancels_only_the_request_whose_client_left() -> None:
    async def scenario() -> tuple[list[object], int]:
        stay = asyncio.Event()  # never set: these clients stay
        listened = 0

        async def staying() -> dict[str, str]:
            nonlocal listened
            listened += 1
            await stay.wait()
            return {"type": "http.disconnect"}

        async def gone() -> dict[str, str]:
            return {"type": "http.disconnect"}

        async def work(seconds: float, result: int) -> int:
            await asyncio.sleep(seconds)
            return result

        calls = [
            until_disconnect(_context(staying), work(0.3, 1)),
            until_disconnect(_context(gone), work(3, 2)),
            until_disconnect(_context(staying), work(0.25, 3)),
            until_disconnect(_context(staying), work(0, 4)),  # too quick to be listened to
        ]
        results = await asyncio.gather(*calls, return_exceptions=True)
        watcher = streams._watchers[asyncio.get_running_loop()]
        await asyncio.sleep(3 * LISTEN_AFTER)  # the timer stops once nothing is watched
        assert not watcher.young and not watcher.old and watcher.timer is None
        return results, listened

    results, listened = asyncio.run(scenario())
    assert results[0] == 1 and results[2] == 3 and results[3] == 4
    assert isinstance(results[1], asyncio.CancelledError)
    assert listened == 2  # the two slow ones that stayed; the quick one never

"""The hot routes dispatched past the framework (routes/common/direct.py) answer exactly as routed ones:
the same envelopes, metrics labels, request ids and method handling, through the real HTTP stack."""

from __future__ import annotations

import httpx
import openai
import pytest

from gateway.routes.common.direct import DirectRoutes
from tests.upstream.conftest import front, sdk, upstream

CHAT = [{"role": "user", "content": "hi"}]


def serve(url: str):
    return front([{"name": "m", "task": "text-generation", "backend": upstream(url)}])


def _direct_table(app) -> dict:
    layer = app.middleware_stack
    while layer is not None and not isinstance(layer, DirectRoutes):
        layer = getattr(layer, "app", None)
    assert layer is not None, "DirectRoutes is not in the middleware stack"
    return layer._table or layer._build()


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

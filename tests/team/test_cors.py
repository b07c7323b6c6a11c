"""CORS: off by default (a preflight is refused), configured origins get their preflight answered
before any key is asked for, and answers carry the headers a browser app may read."""

from __future__ import annotations

import httpx

from tests.conftest import FAKE_MODELS
from tests.helpers import LiveServer, settings_for

ORIGIN = "https://app.example"
PREFLIGHT = {
    "Origin": ORIGIN,
    "Access-Control-Request-Method": "POST",
    "Access-Control-Request-Headers": "authorization,content-type",
}
CHAT = {"model": "fake-chat", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}


def test_off_by_default() -> None:
    with LiveServer(settings_for(FAKE_MODELS)) as server:
        resp = httpx.options(f"{server.url}/v1/chat/completions", headers=PREFLIGHT)
        assert resp.status_code == 405 and "access-control-allow-origin" not in resp.headers
        answer = httpx.post(f"{server.url}/v1/chat/completions", json=CHAT, headers={"Origin": ORIGIN})
        assert "access-control-allow-origin" not in answer.headers


def test_configured_origin() -> None:
    settings = settings_for(FAKE_MODELS, api_keys=["k"], cors_origins=[ORIGIN])
    with LiveServer(settings) as server:
        pre = httpx.options(f"{server.url}/v1/chat/completions", headers=PREFLIGHT)
        assert pre.status_code == 200
        assert pre.headers["access-control-allow-origin"] == ORIGIN
        assert "POST" in pre.headers["access-control-allow-methods"]
        assert "authorization" in pre.headers["access-control-allow-headers"].lower()
        other = httpx.options(
            f"{server.url}/v1/chat/completions", headers={**PREFLIGHT, "Origin": "https://evil.example"}
        )
        assert other.status_code == 400 and "access-control-allow-origin" not in other.headers
        headers = {"Origin": ORIGIN, "Authorization": "Bearer k"}
        answer = httpx.post(f"{server.url}/v1/chat/completions", json=CHAT, headers=headers)
        assert answer.status_code == 200 and answer.headers["access-control-allow-origin"] == ORIGIN
        assert "x-request-id" in answer.headers["access-control-expose-headers"]
        refused = httpx.post(f"{server.url}/v1/chat/completions", json=CHAT, headers={"Origin": ORIGIN})
        assert refused.status_code == 401 and refused.headers["access-control-allow-origin"] == ORIGIN

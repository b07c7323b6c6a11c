"""Keys with scopes through the real HTTP stack: deny by default, scopes per route family,
models a key may not see, revoked and expired keys, the admin API, `Host` checks."""

from __future__ import annotations

import socket
import time
from pathlib import Path
from types import SimpleNamespace

import httpx
import openai
import pytest

from gateway.auth import keys
from tests.conftest import FAKE_MODELS
from tests.helpers import LiveServer, settings_for
from tests.team.conftest import ADMIN, bearer, create_key, team_server

CHAT = {"model": "fake-chat", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}


def sdk(url: str, token: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key=token, max_retries=0, timeout=10)


def test_deny_by_default_in_each_family(team: LiveServer) -> None:
    url = team.url
    for path in ("/health", "/ready", "/ui", "/ui/dashboard", "/ui/static/app.js"):
        assert httpx.get(url + path).status_code != 401, path
    openai_401 = httpx.post(f"{url}/v1/chat/completions", json=CHAT)
    assert openai_401.status_code == 401
    assert openai_401.headers["www-authenticate"] == "Bearer"
    assert openai_401.json()["error"]["code"] == "invalid_api_key"
    hf_401 = httpx.post(f"{url}/generate", json={"inputs": "hi"}, headers=bearer("wrong"))
    assert hf_401.status_code == 401 and hf_401.json()["error_type"] == "authentication"
    for path in ("/metrics", "/admin/keys", "/ui/api/dashboard", "/v1/models", "/info"):
        assert httpx.get(url + path).status_code == 401, path
    with pytest.raises(openai.AuthenticationError):
        sdk(url, "nope").chat.completions.create(**CHAT)


def test_scopes_and_models_of_a_created_key(team: LiveServer) -> None:
    url = team.url
    made = create_key(url, name="alice", scopes=["inference"], models=["fake-chat"])
    token = made["key"]
    assert token.startswith("gw-") and made["name"] == "alice" and made["scopes"] == ["inference"]
    client = sdk(url, token)
    answer = client.chat.completions.create(**CHAT)
    assert answer.choices[0].message.content
    assert [m.id for m in client.models.list().data] == ["fake-chat"]
    # a model outside the key's list is not found (as OpenAI answers), and not listed
    with pytest.raises(openai.NotFoundError) as err:
        client.embeddings.create(model="fake-embed", input="x")
    assert err.value.body["code"] == "model_not_found" and "fake-embed" not in err.value.body["message"].split(":")[-1]
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("fake-embed")
    # TGI's default model is fake-chat: allowed; the HF route for fake-embed is not
    assert httpx.post(f"{url}/generate", json={"inputs": "a"}, headers=bearer(token)).status_code == 200
    hf = httpx.post(f"{url}/models/fake-embed", json={"inputs": "a"}, headers=bearer(token))
    assert hf.status_code == 404 and hf.json()["error_type"] == "not_found"
    # no metrics (nor the dashboard's data), no admin
    assert httpx.get(f"{url}/metrics", headers=bearer(token)).status_code == 403
    assert httpx.get(f"{url}/ui/api/dashboard", headers=bearer(token)).status_code == 403
    assert httpx.get(f"{url}/ui/dashboard").status_code == 200  # the page itself is open: it asks for a key
    forbidden = httpx.get(f"{url}/admin/keys", headers=bearer(token))
    assert forbidden.status_code == 403 and forbidden.json()["error"]["code"] == "insufficient_scope"
    for path in ("/admin/models", "/admin/usage"):  # models at run time are admin work too
        assert httpx.get(f"{url}{path}", headers=bearer(token)).status_code == 403


def test_models_named_by_alias(team: LiveServer) -> None:
    made = create_key(team.url, name="aliased", models=["fake/chat"])
    assert made["models"] == ["fake-chat"]
    answer = httpx.post(
        f"{team.url}/v1/chat/completions", json={**CHAT, "model": "fake/chat"}, headers=bearer(made["key"])
    )
    assert answer.status_code == 200


def test_metrics_scope(team: LiveServer) -> None:
    token = create_key(team.url, name="prometheus", scopes=["metrics"])["key"]
    assert httpx.get(f"{team.url}/metrics", headers=bearer(token)).status_code == 200
    assert httpx.get(f"{team.url}/ui/api/dashboard", headers=bearer(token)).status_code == 200
    refused = httpx.post(f"{team.url}/v1/chat/completions", json=CHAT, headers=bearer(token))
    assert refused.status_code == 403 and refused.json()["error"]["type"] == "permission_error"


def test_metrics_can_be_public(tmp_path: Path) -> None:
    with team_server(tmp_path, metrics_public=True) as server:
        assert httpx.get(f"{server.url}/metrics").status_code == 200
        assert httpx.get(f"{server.url}/v1/models").status_code == 401


def test_revoked_and_expired_keys(team: LiveServer, monkeypatch: pytest.MonkeyPatch) -> None:
    url = team.url
    made = create_key(url, name="bob")
    assert httpx.get(f"{url}/v1/models", headers=bearer(made["key"])).status_code == 200
    listed = httpx.get(f"{url}/admin/keys", headers=bearer(ADMIN)).json()["data"]
    assert {"bob", "config-0"} <= {k["name"] for k in listed}
    assert all("key" not in k and "digest" not in k for k in listed)
    revoked = httpx.delete(f"{url}/admin/keys/{made['id']}", headers=bearer(ADMIN))
    assert revoked.status_code == 200 and revoked.json()["revoked"] is True
    assert httpx.get(f"{url}/v1/models", headers=bearer(made["key"])).status_code == 401
    assert httpx.delete(f"{url}/admin/keys/nope", headers=bearer(ADMIN)).status_code == 404
    # Expiry without racing the wall clock (a 0.5 s key once had to be used within 0.5 s of its
    # creation, on a slow CI machine): the key lives a minute, then the clock the key check
    # reads (keys.time.time; the server runs in this process) moves past its end.
    short = create_key(url, name="carol", expires_in=60)
    assert httpx.get(f"{url}/v1/models", headers=bearer(short["key"])).status_code == 200  # also remembered
    later = time.time() + 61
    monkeypatch.setattr(keys, "time", SimpleNamespace(time=lambda: later))
    assert httpx.get(f"{url}/v1/models", headers=bearer(short["key"])).status_code == 401  # remembered, still checked
    other = create_key(url, name="carol2", expires_in=120)  # a first look-up (not remembered): not expired yet
    assert httpx.get(f"{url}/v1/models", headers=bearer(other["key"])).status_code == 200
    monkeypatch.undo()
    past = create_key(url, name="dave", expires_at=time.time() - 1)
    assert httpx.get(f"{url}/v1/models", headers=bearer(past["key"])).status_code == 401


def test_keys_survive_a_restart_and_only_hashes_are_stored(tmp_path: Path) -> None:
    with team_server(tmp_path) as server:
        token = create_key(server.url, name="erin", scopes=["inference"])["key"]
    assert token.encode() not in (tmp_path / "keys.db").read_bytes()
    with team_server(tmp_path) as server:
        assert httpx.get(f"{server.url}/v1/models", headers=bearer(token)).status_code == 200


def test_admin_refuses_bad_bodies_in_shape(team: LiveServer) -> None:
    bad = httpx.post(f"{team.url}/admin/keys", json={"name": "x", "scopes": ["root"]}, headers=bearer(ADMIN))
    assert bad.status_code == 400 and "error" in bad.json() and bad.json()["error"]["param"]
    unknown = httpx.post(f"{team.url}/admin/keys", json={"name": "x", "models": ["nope"]}, headers=bearer(ADMIN))
    assert unknown.status_code == 400


def test_config_keys_alone_are_full_power_and_admin_needs_a_store() -> None:
    with LiveServer(settings_for(FAKE_MODELS, api_keys=["k"])) as server:
        assert httpx.get(f"{server.url}/metrics", headers=bearer("k")).status_code == 200
        resp = httpx.post(f"{server.url}/admin/keys", json={"name": "x"}, headers=bearer("k"))
        assert resp.status_code == 409 and resp.json()["error"]["code"] == "no_key_store"


def _raw(port: int, request: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.sendall(request)
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = s.recv(65536)
            if not chunk:
                break
            data += chunk
        return data


def test_host_checked_when_keyless_on_loopback() -> None:
    """DNS rebinding: a page served from evil.example that resolves to 127.0.0.1 sends its own Host."""
    with LiveServer(settings_for(FAKE_MODELS)) as server:
        evil = httpx.post(f"{server.url}/v1/chat/completions", json=CHAT, headers={"Host": "evil.example"})
        assert evil.status_code == 400 and evil.json()["error"]["code"] == "invalid_host"
        hf = httpx.post(f"{server.url}/generate", json={"inputs": "a"}, headers={"Host": "evil.example:8000"})
        assert hf.status_code == 422 and hf.json()["error_type"] == "validation"
        for host in ("localhost", f"localhost:{server.port}", f"127.0.0.1:{server.port}", "[::1]:80"):
            ok = httpx.post(f"{server.url}/v1/chat/completions", json=CHAT, headers={"Host": host})
            assert ok.status_code == 200, host
        assert httpx.get(f"{server.url}/health", headers={"Host": "evil.example"}).status_code == 200
        # the seed's JavaScript example: a text/plain JSON body (a "simple" cross-origin request)
        simple = httpx.post(
            f"{server.url}/models/fake-chat", content=b'{"inputs": "hi"}', headers={"Content-Type": "text/plain"}
        )
        assert simple.status_code == 200


def test_authorisation_is_on_the_routed_path(team: LiveServer) -> None:
    """An absolute-form target or dot segments do not turn a guarded path into an open one."""
    for target in (b"http://127.0.0.1/health/../v1/models", b"/health/../v1/models", b"/v1/models?/health"):
        head = _raw(team.port, b"GET " + target + b" HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
        status = head.split(b" ", 2)[1]
        assert status in (b"401", b"404"), (target, head[:200])
        assert status != b"200"


def test_allowed_hosts_configured(tmp_path: Path) -> None:
    with LiveServer(settings_for(FAKE_MODELS, allowed_hosts=["gw.internal"])) as server:
        assert httpx.get(f"{server.url}/v1/models", headers={"Host": "gw.internal:443"}).status_code == 200
        assert httpx.get(f"{server.url}/v1/models").status_code == 400  # 127.0.0.1 is not listed
    with LiveServer(settings_for(FAKE_MODELS, allowed_hosts=["*"])) as server:
        assert httpx.get(f"{server.url}/v1/models", headers={"Host": "anything"}).status_code == 200


def test_keyless_admin_only_on_loopback_and_never_as_a_simple_cross_origin_post() -> None:
    """With no key the admin API (which loads models, so runs code) is not a web page's to call:
    a POST a page could send without a preflight is refused; off loopback nothing is served."""
    json_type = {"content-type": "application/json"}
    with LiveServer(settings_for(FAKE_MODELS)) as laptop:
        laptop.wait_ready()
        assert httpx.get(f"{laptop.url}/admin/models").status_code == 200
        simple = httpx.post(
            f"{laptop.url}/admin/models/fake-chat/unload", content=b"x", headers={"content-type": "text/plain"}
        )
        assert simple.status_code == 403 and "application/json" in simple.json()["error"]["message"]
        assert httpx.post(f"{laptop.url}/admin/models/fake-chat/unload").status_code == 403
        assert httpx.post(f"{laptop.url}/admin/models/fake-chat/unload", headers=json_type).status_code == 200
    with LiveServer(settings_for(FAKE_MODELS, host="0.0.0.0", allowed_hosts=["127.0.0.1"])) as exposed:
        exposed.wait_ready()
        for method in ("GET", "POST"):
            refused = httpx.request(method, f"{exposed.url}/admin/models", headers=json_type)
            assert refused.status_code == 403 and "needs a key" in refused.json()["error"]["message"]
        assert httpx.post(f"{exposed.url}/v1/chat/completions", json=CHAT).status_code == 200  # inference stays keyless

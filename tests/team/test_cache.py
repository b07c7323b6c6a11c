"""The response cache through the real HTTP stack: hit, miss and bypass on OpenAI and HF routes,
SSE framing kept on a replayed stream, never shared across keys that see different models, hits
and misses as metrics; and shared by two gateways through a real Redis."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest
import redis

from tests.conftest import FAKE_MODELS
from tests.helpers import LiveServer, gateway_process, settings_for, wait_until
from tests.team.conftest import ADMIN, bearer, create_key, team_server
from tests.team.redis_server import redis_server

CHAT = {"model": "fake-chat", "messages": [{"role": "user", "content": "one two"}], "max_tokens": 3}


@pytest.fixture(scope="module")
def cached() -> Iterator[LiveServer]:
    with LiveServer(settings_for(FAKE_MODELS, response_cache=True)) as server:
        server.wait_ready()
        yield server


def post(server: LiveServer, path: str, body: object, **headers: str) -> httpx.Response:
    return httpx.post(f"{server.url}{path}", json=body, headers=headers, timeout=10)


def test_deterministic_chat_is_cached(cached: LiveServer) -> None:
    body = {**CHAT, "temperature": 0, "messages": [{"role": "user", "content": "cache me"}]}
    first, second = post(cached, "/v1/chat/completions", body), post(cached, "/v1/chat/completions", body)
    assert first.headers["x-cache"] == "miss" and second.headers["x-cache"] == "hit"
    assert first.json() == second.json()
    assert first.headers["x-request-id"] != second.headers["x-request-id"]
    # key order does not matter (normalised); another seed or prompt is another entry
    reordered = dict(reversed(list(body.items())))
    assert post(cached, "/v1/chat/completions", reordered).headers["x-cache"] == "hit"
    assert post(cached, "/v1/chat/completions", {**body, "max_tokens": 2}).headers["x-cache"] == "miss"
    # the SDK reads a hit like any answer
    client = openai.OpenAI(base_url=f"{cached.url}/v1", api_key="x", max_retries=0)
    raw = client.chat.completions.with_raw_response.create(**body)
    assert (
        raw.headers["x-cache"] == "hit"
        and raw.parse().choices[0].message.content == first.json()["choices"][0]["message"]["content"]
    )


def test_sampling_without_seed_is_not_cached_and_no_cache_bypasses(cached: LiveServer) -> None:
    for _ in range(2):
        assert "x-cache" not in post(cached, "/v1/chat/completions", CHAT).headers
    seeded = {**CHAT, "seed": 7, "temperature": 0.9}
    assert post(cached, "/v1/chat/completions", seeded).headers["x-cache"] == "miss"
    assert post(cached, "/v1/chat/completions", seeded).headers["x-cache"] == "hit"
    fresh = post(cached, "/v1/chat/completions", seeded, **{"Cache-Control": "no-cache"})
    assert fresh.headers["x-cache"] == "miss"


def test_stream_replay_keeps_sse_framing(cached: LiveServer) -> None:
    body = {**CHAT, "temperature": 0, "stream": True, "messages": [{"role": "user", "content": "stream me"}]}
    first, second = post(cached, "/v1/chat/completions", body), post(cached, "/v1/chat/completions", body)
    assert second.headers["x-cache"] == "hit" and second.headers["content-type"].startswith("text/event-stream")
    assert second.text == first.text and second.text.rstrip().endswith("data: [DONE]")
    client = openai.OpenAI(base_url=f"{cached.url}/v1", api_key="x", max_retries=0)
    text = "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(**body) if c.choices)
    assert text


def test_hf_routes_and_use_cache_false(cached: LiveServer) -> None:
    body = {"inputs": "embed these words"}
    first, second = post(cached, "/models/fake-embed", body), post(cached, "/models/fake-embed", body)
    assert (first.headers["x-cache"], second.headers["x-cache"]) == ("miss", "hit") and first.json() == second.json()
    off = post(cached, "/models/fake-embed", {**body, "options": {"use_cache": False}})
    assert off.headers["x-cache"] == "miss"
    tgi = {"inputs": "a b c", "parameters": {"max_new_tokens": 2}}
    assert post(cached, "/generate", tgi).headers["x-cache"] == "miss"
    assert post(cached, "/generate", tgi).headers["x-cache"] == "hit"
    sampled = {"inputs": "a b c", "parameters": {"do_sample": True, "max_new_tokens": 2}}
    assert "x-cache" not in post(cached, "/generate", sampled).headers
    # an error is never kept
    for _ in range(2):
        missing = post(cached, "/models/nope", body)
        assert missing.status_code == 404 and missing.headers["x-cache"] == "miss"
    metrics = httpx.get(f"{cached.url}/metrics").text
    assert 'gateway_cache_lookups_total{model="fake-embed",result="hit"}' in metrics
    assert 'gateway_cache_lookups_total{model="fake-embed",result="bypass"}' in metrics


def test_not_shared_across_model_visibility(tmp_path: Path) -> None:
    with team_server(tmp_path, response_cache=True) as server:
        narrow = create_key(server.url, name="narrow", models=["fake-chat"])["key"]
        wide = create_key(server.url, name="wide")["key"]
        body = {**CHAT, "temperature": 0}
        assert (
            httpx.post(f"{server.url}/v1/chat/completions", json=body, headers=bearer(wide)).headers["x-cache"]
            == "miss"
        )
        other = httpx.post(f"{server.url}/v1/chat/completions", json=body, headers=bearer(narrow))
        assert other.headers["x-cache"] == "miss"  # another visibility: its own entry
        again = httpx.post(f"{server.url}/v1/chat/completions", json=body, headers=bearer(ADMIN))
        assert again.headers["x-cache"] == "hit"  # same visibility (every model) as `wide`
        embed = {"model": "fake-embed", "input": "x"}
        httpx.post(f"{server.url}/v1/embeddings", json=embed, headers=bearer(wide))
        refused = httpx.post(f"{server.url}/v1/embeddings", json=embed, headers=bearer(narrow))
        assert refused.status_code == 404


def test_shared_through_redis(tmp_path: Path) -> None:
    with redis_server(tmp_path) as url:
        config = {
            "server": {"redis_url": url, "response_cache": True, "access_log": False},
            "models": [{"name": "fake-chat", "task": "text-generation", "backend": {"kind": "fake"}}],
        }
        body = {**CHAT, "temperature": 0}
        with gateway_process(config, tmp_path) as one, gateway_process(config, tmp_path) as two:
            first = httpx.post(f"{one}/v1/chat/completions", json=body)
            # `one` stores its answer after sending it: asking `two` at once raced that write
            _until_stored(url)
            second = httpx.post(f"{two}/v1/chat/completions", json=body)
            assert (first.headers["x-cache"], second.headers["x-cache"]) == ("miss", "hit")
            assert first.json() == second.json()


def _until_stored(url: str) -> None:
    """Until the response cache in Redis holds an entry."""
    with contextlib.closing(redis.Redis.from_url(url)) as client:
        wait_until(lambda: client.keys("gateway:cache:*"), "an answer in the shared cache", interval=0.01)


def test_no_answer_outlives_its_model() -> None:
    """A model removed or replaced at run time: its cached answers are not replayed."""
    json_type = {"content-type": "application/json"}
    with LiveServer(settings_for(FAKE_MODELS, response_cache=True)) as server:
        server.wait_ready()
        spec = {"name": "extra", "task": "text-generation", "backend": {"kind": "fake"}}
        assert httpx.post(f"{server.url}/admin/models", json=spec).status_code == 201
        body = {**CHAT, "model": "extra", "temperature": 0}
        assert post(server, "/v1/chat/completions", body).headers["x-cache"] == "miss"
        assert post(server, "/v1/chat/completions", body).headers["x-cache"] == "hit"
        assert httpx.delete(f"{server.url}/admin/models/extra", headers=json_type).status_code == 200
        gone = post(server, "/v1/chat/completions", body)
        assert gone.status_code == 404 and gone.headers.get("x-cache") != "hit"
        # the same name back with another spec: answers start afresh
        other = {**spec, "backend": {"kind": "fake", "dimensions": 4}}
        assert httpx.post(f"{server.url}/admin/models", json=other).status_code == 201
        assert post(server, "/v1/chat/completions", body).headers["x-cache"] == "miss"

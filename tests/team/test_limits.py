"""Per-key limits and usage: 429 with Retry-After and OpenAI's x-ratelimit-* headers (HF's shape
on HF routes), tokens reserved from max_tokens and settled, per-model limits, usage in the admin
API and in /metrics; and two gateway processes sharing one budget exactly through a real Redis."""

from __future__ import annotations

import concurrent.futures
import contextlib
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, cast

import httpx
import openai
import pytest
import redis

from tests.helpers import LiveServer, free_port, gateway_process, wait_until
from tests.team.conftest import ADMIN, bearer, create_key, team_server
from tests.team.redis_server import redis_server

CHAT = {"model": "fake-chat", "messages": [{"role": "user", "content": "one two three"}], "max_tokens": 4}


@pytest.fixture(scope="module")
def limited(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    with team_server(tmp_path_factory.mktemp("limits")) as server:
        server.wait_ready()
        yield server


def wait_for_minute_room(seconds: float = 8) -> None:
    """Tests count within one fixed one-minute window: do not start just before it rolls over."""
    left = 60 - time.time() % 60
    if left < seconds:
        time.sleep(left + 0.05)


def test_requests_per_minute(limited: LiveServer) -> None:
    wait_for_minute_room()
    token = create_key(limited.url, name="rpm3", limits={"rpm": 3})["key"]
    seen = []
    for _ in range(3):
        resp = httpx.post(f"{limited.url}/v1/chat/completions", json=CHAT, headers=bearer(token))
        assert resp.status_code == 200
        seen.append(resp.headers["x-ratelimit-remaining-requests"])
        assert resp.headers["x-ratelimit-limit-requests"] == "3"
    assert seen == ["2", "1", "0"]
    over = httpx.post(f"{limited.url}/v1/chat/completions", json=CHAT, headers=bearer(token))
    assert over.status_code == 429
    assert over.json()["error"]["type"] == "rate_limit_error" and over.json()["error"]["code"] == "rate_limit_exceeded"
    assert 1 <= int(over.headers["retry-after"]) <= 60
    assert over.headers["x-ratelimit-remaining-requests"] == "0"
    assert over.headers["x-ratelimit-reset-requests"].endswith("s")
    client = openai.OpenAI(base_url=f"{limited.url}/v1", api_key=token, max_retries=0)
    with pytest.raises(openai.RateLimitError):
        client.chat.completions.create(**CHAT)
    hf = httpx.post(f"{limited.url}/generate", json={"inputs": "a"}, headers=bearer(token))
    assert hf.status_code == 429 and hf.json()["error_type"] == "rate_limit" and "retry-after" in hf.headers


def test_tokens_per_minute_reserved_then_settled(limited: LiveServer) -> None:
    wait_for_minute_room()
    token = create_key(limited.url, name="tpm", limits={"tpm": 40})["key"]
    first = httpx.post(f"{limited.url}/v1/chat/completions", json=CHAT, headers=bearer(token))
    assert first.status_code == 200
    # reserved at the start: max_tokens (4) charged before the answer was known
    assert first.headers["x-ratelimit-remaining-tokens"] == "36"
    used = first.json()["usage"]["total_tokens"]
    second = httpx.post(f"{limited.url}/v1/chat/completions", json=CHAT, headers=bearer(token))
    # settled: the first now counts its real total, the second its reservation
    assert second.headers["x-ratelimit-remaining-tokens"] == str(40 - used - 4)
    # a reservation that does not fit is refused up front
    too_big = httpx.post(f"{limited.url}/v1/chat/completions", json={**CHAT, "max_tokens": 39}, headers=bearer(token))
    assert too_big.status_code == 429 and "x-ratelimit-limit-tokens" in too_big.headers


def test_per_model_limit_and_usage(limited: LiveServer) -> None:
    wait_for_minute_room()
    made = create_key(limited.url, name="permodel", model_limits={"fake-chat": {"rpm": 1}})
    token = made["key"]
    assert httpx.post(f"{limited.url}/v1/chat/completions", json=CHAT, headers=bearer(token)).status_code == 200
    assert httpx.post(f"{limited.url}/v1/chat/completions", json=CHAT, headers=bearer(token)).status_code == 429
    embed = {"model": "fake-embed", "input": "a b"}
    for _ in range(2):
        assert httpx.post(f"{limited.url}/v1/embeddings", json=embed, headers=bearer(token)).status_code == 200
    usage = httpx.get(f"{limited.url}/admin/usage", headers=bearer(ADMIN)).json()["data"]
    mine = {row["model"]: row for row in usage if row["key"] == "permodel"}
    assert mine["fake-chat"]["requests"] == 2 and mine["fake-embed"]["requests"] == 2  # the 429 counts too
    assert mine["fake-chat"]["completion_tokens"] > 0 and mine["fake-embed"]["prompt_tokens"] > 0
    metrics = httpx.get(f"{limited.url}/metrics", headers=bearer(ADMIN)).text
    assert 'gateway_key_requests_total{key="permodel",model="fake-embed"} 2.0' in metrics
    assert 'gateway_key_tokens_total{key="permodel",kind="completion",model="fake-chat"}' in metrics


def _config(redis_url: str, key_db: Path) -> dict[str, Any]:
    return {
        "server": {"redis_url": redis_url, "key_db": str(key_db), "api_keys": [ADMIN], "access_log": False},
        "models": [{"name": "fake-chat", "task": "text-generation", "default": True, "backend": {"kind": "fake"}}],
    }


def test_two_gateways_share_one_budget_in_redis(tmp_path: Path) -> None:
    with redis_server(tmp_path) as url:
        config = _config(url, tmp_path / "keys.db")
        with gateway_process(config, tmp_path) as one, gateway_process(config, tmp_path) as two:
            token = create_key(one, name="shared", limits={"rpm": 10})["key"]
            _until_known(two, token)
            wait_for_minute_room()  # each counted round within one window, guarded just before it

            def call(i: int) -> int:
                target = one if i % 2 else two
                return httpx.post(f"{target}/v1/chat/completions", json=CHAT, headers=bearer(token)).status_code

            with concurrent.futures.ThreadPoolExecutor(8) as pool:
                statuses = list(pool.map(call, range(30)))
            assert statuses.count(200) == 10 and statuses.count(429) == 20, statuses
            # tokens: reserved on one replica, settled there, seen by the other
            made = create_key(one, name="tokens", limits={"tpm": 100})
            tpm = made["key"]
            _until_known(two, tpm)
            wait_for_minute_room()
            first = httpx.post(f"{one}/v1/chat/completions", json=CHAT, headers=bearer(tpm))
            assert first.headers["x-ratelimit-remaining-tokens"] == "96"  # 4 reserved
            used = first.json()["usage"]["total_tokens"]
            # `one` settles after its answer is sent, in its next batch to Redis: asking `two` at
            # once raced that call. Wait for Redis to count the real total (never, on the bug).
            _until_settled(url, made["id"], used)
            second = httpx.post(f"{two}/v1/chat/completions", json=CHAT, headers=bearer(tpm))
            assert second.headers["x-ratelimit-remaining-tokens"] == str(100 - used - 4)


def _until_known(url: str, token: str) -> None:
    """The other replica sees a new key within its reload interval (2 s)."""
    wait_until(
        lambda: httpx.get(f"{url}/v1/models", headers=bearer(token)).status_code == 200,
        "the key known to the other replica",
        interval=0.1,
    )


def _until_settled(url: str, key_id: str, used: int) -> None:
    """Until the key's token count in Redis (this window's) is `used`."""

    def tokens(client: redis.Redis) -> int:
        return int(cast(bytes | None, client.get(f"gateway:rl:k:{key_id}:{int(time.time() // 60)}:t")) or 0)

    with contextlib.closing(redis.Redis.from_url(url)) as client:
        wait_until(lambda: tokens(client) == used, "the settlement in Redis", interval=0.01)


def test_redis_down_refuses_limited_keys_and_cache_still_serves(tmp_path: Path) -> None:
    dead = f"redis://127.0.0.1:{free_port()}/0"
    with team_server(tmp_path, redis_url=dead, response_cache=True) as server:
        limited = create_key(server.url, name="limited", limits={"rpm": 5})["key"]
        refused = httpx.post(f"{server.url}/v1/chat/completions", json=CHAT, headers=bearer(limited))
        assert refused.status_code == 503 and refused.json()["error"]["code"] == "limits_unavailable"
        free = create_key(server.url, name="free")["key"]
        body = {**CHAT, "temperature": 0}
        for _ in range(2):
            answer = httpx.post(f"{server.url}/v1/chat/completions", json=body, headers=bearer(free))
            assert answer.status_code == 200 and answer.headers["x-cache"] == "miss"

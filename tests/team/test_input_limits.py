"""Input limits (server.max_*): each a 4xx in the API family's own shape."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from tests.conftest import FAKE_MODELS
from tests.helpers import LiveServer, settings_for

LIMITS = {"max_messages": 3, "max_json_depth": 8, "max_n": 2, "max_stop": 2, "max_logit_bias": 2}


@pytest.fixture(scope="module")
def limited() -> Iterator[LiveServer]:
    with LiveServer(settings_for(FAKE_MODELS, max_header_bytes=4096, max_body_bytes=4096, **LIMITS)) as server:
        server.wait_ready()
        yield server


def chat(**extra: Any) -> dict[str, Any]:
    return {"model": "fake-chat", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, **extra}


def nested(depth: int) -> Any:
    value: Any = "x"
    for _ in range(depth):
        value = [value]
    return value


@pytest.mark.parametrize(
    ("body", "param"),
    [
        (chat(messages=[{"role": "user", "content": "a"}] * 4), "messages"),
        (chat(n=3), "n"),
        (chat(stop=["a", "b", "c"]), "stop"),
        (chat(logit_bias={"1": 1, "2": 1, "3": 1}), "logit_bias"),
        (chat(metadata={"deep": nested(10)}), None),
    ],
    ids=["messages", "n", "stop", "logit_bias", "depth"],
)
def test_openai_limits(limited: LiveServer, body: dict[str, Any], param: str | None) -> None:
    resp = httpx.post(f"{limited.url}/v1/chat/completions", json=body)
    assert resp.status_code == 400, resp.text
    error = resp.json()["error"]
    assert error["code"] == "input_too_large" and error["type"] == "invalid_request_error"
    assert error["param"] == param


def test_within_limits_is_served(limited: LiveServer) -> None:
    body = chat(messages=[{"role": "user", "content": "a"}] * 3, n=2, stop=["a", "b"], metadata={"d": nested(5)})
    assert httpx.post(f"{limited.url}/v1/chat/completions", json=body).status_code == 200


def test_hf_limits(limited: LiveServer) -> None:
    deep = httpx.post(f"{limited.url}/generate", json={"inputs": "a", "parameters": {"x": nested(10)}})
    assert deep.status_code == 422 and deep.json()["error_type"] == "validation"
    assert "deeper" in deep.json()["error"]
    model = httpx.post(f"{limited.url}/models/fake-embed", json={"inputs": nested(10)})
    assert model.status_code == 422 and "deeper" in model.json()["error"]


def test_header_and_body_size(limited: LiveServer) -> None:
    big = httpx.post(f"{limited.url}/v1/chat/completions", json=chat(), headers={"x-filler": "a" * 5000})
    assert big.status_code == 431 and big.json()["error"]["code"] == "headers_too_large"
    body = httpx.post(f"{limited.url}/v1/chat/completions", json=chat(user="a" * 5000))
    assert body.status_code == 413 and body.json()["error"]["code"] == "request_too_large"
    hf = httpx.post(f"{limited.url}/generate", json={"inputs": "a"}, headers={"x-filler": "a" * 5000})
    assert hf.status_code == 431 and hf.json()["error_type"] == "validation"

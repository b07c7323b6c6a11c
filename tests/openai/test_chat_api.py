"""OpenAI chat and completions through the real HTTP stack, with the openai SDK, over fake backends."""

from __future__ import annotations

import httpx
import openai
import pytest

from tests.helpers import LiveServer


@pytest.fixture()
def client(fake_server: LiveServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{fake_server.url}/v1", api_key="sk-test", max_retries=0)


def test_chat_completion_shape_and_usage(client: openai.OpenAI) -> None:
    resp = client.chat.completions.create(
        model="fake-chat", messages=[{"role": "user", "content": "alpha beta gamma"}], temperature=0
    )
    assert resp.object == "chat.completion"
    assert resp.choices[0].message.role == "assistant"
    assert resp.choices[0].message.content == "alpha beta gamma"
    assert resp.choices[0].finish_reason == "stop"
    assert resp.usage is not None
    assert (resp.usage.prompt_tokens, resp.usage.completion_tokens, resp.usage.total_tokens) == (3, 3, 6)


def test_alias_resolves_and_model_echoed(client: openai.OpenAI) -> None:
    resp = client.chat.completions.create(
        model="fake/chat", messages=[{"role": "user", "content": "x y"}], temperature=0
    )
    assert resp.model == "fake/chat"
    assert resp.choices[0].message.content == "x y"


def test_max_tokens_and_max_completion_tokens(client: openai.OpenAI) -> None:
    msgs = [{"role": "user", "content": "a b c d e f"}]
    r1 = client.chat.completions.create(model="fake-chat", messages=msgs, temperature=0, max_tokens=2)
    r2 = client.chat.completions.create(model="fake-chat", messages=msgs, temperature=0, max_completion_tokens=3)
    assert (r1.choices[0].message.content, r1.choices[0].finish_reason) == ("a b", "length")
    assert (r2.choices[0].message.content, r2.choices[0].finish_reason) == ("a b c", "length")
    assert r1.usage.completion_tokens == 2 and r2.usage.completion_tokens == 3


def test_stream_with_usage_chunk(client: openai.OpenAI) -> None:
    stream = client.chat.completions.create(
        model="fake-chat",
        messages=[{"role": "user", "content": "one two three"}],
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    content = [c for c in chunks if c.choices]
    assert content[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in content) == "one two three"
    assert content[-1].choices[0].finish_reason == "stop"
    usage_chunks = [c for c in chunks if c.usage is not None]
    assert len(usage_chunks) == 1 and usage_chunks[0] is chunks[-1] and usage_chunks[0].choices == []
    assert usage_chunks[0].usage.completion_tokens == 3


def test_stream_without_usage_has_no_usage_chunk(client: openai.OpenAI) -> None:
    chunks = list(
        client.chat.completions.create(
            model="fake-chat", messages=[{"role": "user", "content": "p q"}], temperature=0, stream=True
        )
    )
    assert all(c.usage is None for c in chunks) and all(c.choices for c in chunks)


def test_raw_sse_framing(fake_server: LiveServer) -> None:
    body = {"model": "fake-chat", "messages": [{"role": "user", "content": "a b"}], "stream": True, "temperature": 0}
    with httpx.stream("POST", f"{fake_server.url}/v1/chat/completions", json=body) as resp:
        assert resp.headers["content-type"].startswith("text/event-stream")
        raw = resp.read().decode()
    events = raw.split("\n\n")
    assert events[-1] == "" and events[-2] == "data: [DONE]"
    for event in events[:-2]:
        assert event.startswith("data: {") and "\n" not in event  # one line of JSON per event


def test_stop_sequence(client: openai.OpenAI) -> None:
    msgs = [{"role": "user", "content": "red green blue yellow"}]
    resp = client.chat.completions.create(model="fake-chat", messages=msgs, temperature=0, stop=[" blue"])
    assert resp.choices[0].message.content == "red green"
    assert resp.choices[0].finish_reason == "stop"
    chunks = list(
        client.chat.completions.create(model="fake-chat", messages=msgs, temperature=0, stop="yel", stream=True)
    )
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == "red green blue "


def test_n_choices(client: openai.OpenAI) -> None:
    resp = client.chat.completions.create(
        model="fake-chat", messages=[{"role": "user", "content": "a b c d"}], n=3, seed=7, max_tokens=4
    )
    assert [c.index for c in resp.choices] == [0, 1, 2]
    assert resp.usage.completion_tokens == 12
    streamed = list(
        client.chat.completions.create(
            model="fake-chat", messages=[{"role": "user", "content": "a b c d"}], n=3, seed=7, max_tokens=4, stream=True
        )
    )
    by_index: dict[int, str] = {}
    for chunk in streamed:
        for choice in chunk.choices:
            by_index[choice.index] = by_index.get(choice.index, "") + (choice.delta.content or "")
    assert by_index == {c.index: c.message.content for c in resp.choices}


def test_seed_reproducible_per_request(client: openai.OpenAI) -> None:
    msgs = [{"role": "user", "content": "w1 w2 w3 w4 w5 w6 w7 w8"}]

    def run(seed: int) -> str:
        r = client.chat.completions.create(model="fake-chat", messages=msgs, seed=seed, temperature=1, max_tokens=12)
        return r.choices[0].message.content or ""

    assert run(1) == run(1)
    assert len({run(s) for s in range(5)}) > 1


def test_completions_prompt_list_and_stream(client: openai.OpenAI) -> None:
    resp = client.completions.create(model="fake-chat", prompt=["a b", "c d e"], temperature=0, max_tokens=5)
    assert resp.object == "text_completion"
    assert [c.text for c in resp.choices] == ["a b", "c d e"]
    assert resp.usage.prompt_tokens == 5
    chunks = list(
        client.completions.create(
            model="fake-chat",
            prompt="x y z",
            temperature=0,
            max_tokens=2,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert "".join(c.choices[0].text for c in chunks if c.choices) == "x y"
    assert chunks[-1].usage.completion_tokens == 2


def test_models_list_and_retrieve(client: openai.OpenAI) -> None:
    models = {m.id: m for m in client.models.list()}
    assert set(models) == {"fake-chat", "fake-embed"}
    assert models["fake-chat"].model_extra["state"] == "ready"
    one = client.models.retrieve("fake/chat")
    assert one.id == "fake-chat"


def test_request_id_on_every_response(fake_server: LiveServer) -> None:
    ok = httpx.get(f"{fake_server.url}/v1/models")
    missing = httpx.get(f"{fake_server.url}/v1/nothing")
    echoed = httpx.get(f"{fake_server.url}/health", headers={"x-request-id": "abc-123"})
    assert ok.headers["x-request-id"] and missing.headers["x-request-id"]
    assert echoed.headers["x-request-id"] == "abc-123"
    # ids that could not be echoed or logged as they are get replaced by our own
    for unsafe in ('a"b', "a b", "x" * 129, "caf\u00e9"):
        got = httpx.get(f"{fake_server.url}/health", headers={"x-request-id": unsafe.encode()}).headers["x-request-id"]
        assert got != unsafe and len(got) == 32 and int(got, 16) >= 0
    assert missing.status_code == 404 and missing.json()["error"]["message"]

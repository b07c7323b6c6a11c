"""The local backend on a tiny random Llama, loaded from a folder through the real loading code."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import openai
import pytest
import torch

from tests.helpers import LiveServer, settings_for
from tests.tiny_models import build_tiny_llama


@pytest.fixture(scope="module")
def tiny_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    folder = build_tiny_llama(tmp_path_factory.mktemp("tiny-llama"))
    models = [
        {
            "name": "tiny",
            "task": "text-generation",
            "backend": {"kind": "local", "source": str(folder), "dtype": "float32", "device": "cpu"},
        }
    ]
    settings = settings_for(models)
    settings.cache_dir = Path(tmp_path_factory.mktemp("cache"))
    with LiveServer(settings) as server:
        server.wait_ready(120)
        yield server


@pytest.fixture()
def client(tiny_server: LiveServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{tiny_server.url}/v1", api_key="x", max_retries=0)


def chat(client: openai.OpenAI, **kw: object) -> openai.types.chat.ChatCompletion:
    args = {"model": "tiny", "messages": [{"role": "user", "content": "hello world"}], "max_tokens": 24, **kw}
    return client.chat.completions.create(**args)  # type: ignore[arg-type]


def test_model_card_reports_loaded_state(client: openai.OpenAI) -> None:
    card = client.models.retrieve("tiny")
    assert card.model_extra["state"] == "ready" and card.model_extra["max_model_len"] == 256


def test_greedy_is_deterministic_and_counts_tokens(client: openai.OpenAI) -> None:
    a, b = chat(client, temperature=0), chat(client, temperature=0)
    assert a.choices[0].message.content == b.choices[0].message.content
    choice = a.choices[0]
    assert a.usage.completion_tokens <= 24
    if choice.finish_reason == "length":
        assert a.usage.completion_tokens == 24
    assert a.usage.prompt_tokens > 2


def test_seed_is_per_request_and_ignores_global_rng(client: openai.OpenAI) -> None:
    first = chat(client, seed=5, temperature=1.0).choices[0].message.content
    torch.manual_seed(1234)
    torch.rand(100)  # disturb the global RNG: a per-request seed must not notice
    again = chat(client, seed=5, temperature=1.0).choices[0].message.content
    others = {chat(client, seed=s, temperature=1.0).choices[0].message.content for s in range(6, 10)}
    assert first == again
    assert len(others | {first}) > 1


def test_n_choices_are_distinct_and_reproducible(client: openai.OpenAI) -> None:
    one = chat(client, n=2, seed=3, temperature=1.0)
    two = chat(client, n=2, seed=3, temperature=1.0)
    texts = [c.message.content for c in one.choices]
    assert texts == [c.message.content for c in two.choices]
    assert texts[0] != texts[1]


def test_stop_sequence_cuts_real_tokenizer_output(client: openai.OpenAI) -> None:
    full = chat(client, temperature=0, max_tokens=40).choices[0].message.content or ""
    assert len(full) > 6
    stop = full[3:6]
    cut = chat(client, temperature=0, max_tokens=40, stop=[stop]).choices[0]
    assert cut.finish_reason == "stop"
    assert cut.message.content == full[: full.index(stop)]
    streamed = chat(client, temperature=0, max_tokens=40, stop=[stop], stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in streamed if c.choices) == cut.message.content


def test_stream_equals_non_stream(client: openai.OpenAI) -> None:
    whole = chat(client, temperature=0).choices[0].message.content
    parts = chat(client, temperature=0, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in parts) == whole


def test_completions_on_raw_prompt(client: openai.OpenAI) -> None:
    resp = client.completions.create(model="tiny", prompt="the quick brown", max_tokens=5, temperature=0)
    assert resp.usage.completion_tokens <= 5 and resp.usage.prompt_tokens >= 2


def test_prompt_longer_than_context_is_400(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        chat(client, messages=[{"role": "user", "content": "one two three " * 200}])
    assert "tokens" in info.value.message
    with pytest.raises(openai.BadRequestError) as info:
        chat(client, max_tokens=10_000)
    assert info.value.param == "max_tokens"

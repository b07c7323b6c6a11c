"""Our gateway in front of a second gateway process (fake models) on loopback: every OpenAI route.
test_tiny_model_chain.py does the same with real (tiny) models and the HF and TGI routes."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers import gateway_process
from tests.upstream.conftest import front, sdk, upstream

DOWNSTREAM_MODELS = [
    {"name": "down-chat", "task": "text-generation", "backend": {"kind": "fake", "delay_ms": 5}},
    {"name": "down-embed", "task": "feature-extraction", "backend": {"kind": "fake", "dimensions": 6}},
    {"name": "down-slow", "task": "text-generation", "backend": {"kind": "fake", "delay_ms": 300}},
]


@pytest.fixture(scope="module")
def downstream(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    tmp: Path = tmp_path_factory.mktemp("downstream")
    with gateway_process({"models": DOWNSTREAM_MODELS}, tmp) as url:
        yield url


@pytest.fixture(scope="module")
def chain(downstream: str) -> Iterator[object]:
    models = [
        {"name": "chat", "task": "text-generation", "backend": upstream(f"{downstream}/v1", model="down-chat")},
        {"name": "embed", "task": "feature-extraction", "backend": upstream(f"{downstream}/v1", model="down-embed")},
        {"name": "slow", "task": "text-generation", "backend": upstream(f"{downstream}/v1", model="down-slow")},
    ]
    with front(models) as server:
        server.wait_ready(30)
        yield server


def test_chat_completion_round_trip(chain, downstream) -> None:
    client = sdk(chain)
    reply = client.chat.completions.create(
        model="chat", messages=[{"role": "user", "content": "one two three"}], temperature=0, max_tokens=10
    )
    direct = sdk_direct(downstream).chat.completions.create(
        model="down-chat", messages=[{"role": "user", "content": "one two three"}], temperature=0, max_tokens=10
    )
    assert reply.model == "chat"  # the public name, not the upstream's
    assert reply.choices[0].message.content == direct.choices[0].message.content == "one two three"
    assert reply.choices[0].finish_reason == direct.choices[0].finish_reason
    assert reply.usage.prompt_tokens == direct.usage.prompt_tokens
    assert reply.usage.completion_tokens == direct.usage.completion_tokens


def test_chat_stream_passes_each_chunk(chain, downstream) -> None:
    args = dict(
        messages=[{"role": "user", "content": "alpha beta gamma delta"}],
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(sdk(chain).chat.completions.create(model="chat", **args))
    direct = list(sdk_direct(downstream).chat.completions.create(model="down-chat", **args))
    texts = [c.choices[0].delta.content for c in chunks if c.choices]
    assert "".join(texts) == "alpha beta gamma delta"
    assert len(texts) == 4  # one chunk per upstream token: nothing merged or buffered
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 4
    reasons = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert (
        reasons == [c.choices[0].finish_reason for c in direct if c.choices] == [None, None, None, "stop"]
    )  # the fake echoed its whole prompt


def test_each_chunk_reaches_the_client_while_the_upstream_still_generates(chain) -> None:
    arrivals = []
    started = time.monotonic()
    for chunk in sdk(chain).chat.completions.create(
        model="slow", messages=[{"role": "user", "content": "one two three four"}], temperature=0, stream=True
    ):
        if chunk.choices and chunk.choices[0].delta.content:
            arrivals.append(time.monotonic() - started)
    # The upstream makes a token every 0.3 s: a gateway that buffered would hand all four over at the end.
    assert len(arrivals) == 4
    assert arrivals[-1] >= 0.9
    assert arrivals[0] < arrivals[-1] - 0.6


def test_completions_stream_and_not(chain) -> None:
    client = sdk(chain)
    whole = client.completions.create(model="chat", prompt="red green blue", temperature=0, max_tokens=2)
    assert whole.choices[0].text == "red green"
    assert whole.choices[0].finish_reason == "length"
    parts = [
        c.choices[0].text
        for c in client.completions.create(
            model="chat", prompt="red green blue", temperature=0, max_tokens=2, stream=True
        )
        if c.choices
    ]
    assert "".join(parts) == "red green"


def test_sampling_parameters_reach_the_upstream(chain, downstream) -> None:
    args = dict(messages=[{"role": "user", "content": "a b c d e f"}], temperature=0.9, seed=7, max_tokens=6)
    via = sdk(chain).chat.completions.create(model="chat", **args)
    direct = sdk_direct(downstream).chat.completions.create(model="down-chat", **args)
    assert via.choices[0].message.content == direct.choices[0].message.content


def test_embeddings_round_trip(chain, downstream) -> None:
    via = sdk(chain).embeddings.create(model="embed", input=["x y", "z"])
    direct = sdk_direct(downstream).embeddings.create(model="down-embed", input=["x y", "z"])
    assert [d.embedding for d in via.data] == [d.embedding for d in direct.data]
    assert len(via.data[0].embedding) == 6
    assert via.usage.prompt_tokens == direct.usage.prompt_tokens


def sdk_direct(url: str):
    import openai

    return openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=20)

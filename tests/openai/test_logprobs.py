"""OpenAI log-probabilities through the real HTTP stack and the OpenAI SDK, on the default chat model
(SmolLM2, fused path) and a tiny Llama (fused and generic paths), checked against transformers'
own forward of the same weights in float32: chat `logprobs`/`top_logprobs`, completions
`logprobs`/`echo`, streamed and not, and the errors."""

from __future__ import annotations

import codecs
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import torch

from tests.engine import numerics
from tests.helpers import LiveServer, settings_for
from tests.tiny_models import build_tiny_llama

pytestmark = pytest.mark.slow

QUESTION = "Say hello in Japanese, then in French."
PROMPT = "The capital of France is"
MODELS = ["smol", "tiny", "tiny-generic"]  # the fused path on a real model; both paths on a tiny one


def _local(name: str, source: str, **extra: Any) -> dict[str, Any]:
    backend = {"kind": "local", "source": source, "dtype": "float32", "device": "cpu", **extra}
    return {"name": name, "task": "text-generation", "backend": backend}


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_llama(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="module")
def server(tiny_folder: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    models = [
        _local("smol", numerics.SOURCE),
        _local("tiny", str(tiny_folder)),
        _local("tiny-generic", str(tiny_folder), fused=False),
        {"name": "fake", "task": "text-generation", "backend": {"kind": "fake"}},
    ]
    settings = settings_for(models)
    settings.cache_dir = Path(tmp_path_factory.mktemp("cache"))
    with LiveServer(settings) as live:
        live.wait_ready(300)
        yield live


@pytest.fixture(scope="module")
def references(tiny_folder: Path) -> dict[str, tuple[Any, Any]]:
    """(tokenizer, transformers model) per served model, the same weights in float32."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tiny = (AutoTokenizer.from_pretrained(tiny_folder), AutoModelForCausalLM.from_pretrained(tiny_folder).float())
    return {"smol": numerics.load(torch.float32, fused=None), "tiny": tiny, "tiny-generic": tiny}


@pytest.fixture()
def client(server: LiveServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="x", max_retries=0, timeout=120)


def _byte_ids(tokenizer: Any) -> dict[bytes, int]:
    """Each (non-added) token's bytes -> its ID, through GPT-2's byte alphabet (both tokenizers are
    byte-level BPE): recovers the IDs the answer's `bytes` fields name."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    to_byte = {c: b for b, c in bytes_to_unicode().items()}
    added = set(tokenizer.added_tokens_decoder)
    table = {}
    for piece, token in tokenizer.get_vocab().items():
        if token not in added:
            table[bytes(to_byte[c] for c in piece)] = token
    return table


def _is_utf8(raw: bytes) -> bool:
    try:
        raw.decode()
    except UnicodeDecodeError:
        return False
    return True


@torch.inference_mode()
def _reference(model: Any, ids: list[int]) -> torch.Tensor:
    """Raw log-probabilities predicting each token after the first (transformers' forward, float32)."""
    return torch.log_softmax(numerics.reference_logits(model, ids), -1)


@pytest.mark.parametrize("name", MODELS)
def test_chat_greedy_logprobs_match_transformers(client: openai.OpenAI, references, name: str) -> None:
    tokenizer, reference = references[name]
    reply = client.chat.completions.create(
        model=name,
        messages=[{"role": "user", "content": QUESTION}],
        temperature=0,
        max_tokens=16,
        logprobs=True,
        top_logprobs=5,
    )
    choice = reply.choices[0]
    content = choice.logprobs.content
    assert choice.logprobs.refusal is None and len(content) == reply.usage.completion_tokens - (
        choice.finish_reason == "stop"
    )
    # the bytes give the text back, characters split across tokens included (the text leaves out
    # a last character the token budget cut short)
    raw = b"".join(bytes(e.bytes) for e in content)
    assert codecs.getincrementaldecoder("utf-8")(errors="replace").decode(raw) == choice.message.content
    for entry in content:  # a token that is part of a character is named by its bytes, as OpenAI does
        whole = _is_utf8(bytes(entry.bytes))
        assert entry.token == bytes(entry.bytes).decode() if whole else entry.token.startswith("bytes:\\x")
    assert name != "smol" or not all(_is_utf8(bytes(e.bytes)) for e in content)  # the question makes some
    table = _byte_ids(tokenizer)
    ids = numerics.chat_ids(tokenizer, QUESTION) + [table[bytes(e.bytes)] for e in content]
    expected = _reference(reference, ids)[-len(content) :]
    for entry, row, token in zip(content, expected, ids[-len(content) :], strict=True):
        assert len(entry.top_logprobs) == 5
        best = entry.top_logprobs[0]
        assert (best.token, best.bytes, best.logprob) == (entry.token, entry.bytes, entry.logprob)  # argmax
        assert sum(math.exp(t.logprob) for t in entry.top_logprobs) <= 1 + 1e-6
        assert entry.logprob == pytest.approx(float(row[token]), abs=2e-3), name
        top = torch.topk(row, 5).values.tolist()
        assert [t.logprob for t in entry.top_logprobs] == pytest.approx(top, abs=2e-3), name


@pytest.mark.parametrize("name", MODELS)
def test_streamed_logprobs_equal_whole(client: openai.OpenAI, name: str) -> None:
    chat = dict(model=name, messages=[{"role": "user", "content": QUESTION}], temperature=0, max_tokens=12)
    whole = client.chat.completions.create(**chat, logprobs=True, top_logprobs=3)  # type: ignore[call-overload]
    streamed = []
    for chunk in client.chat.completions.create(**chat, logprobs=True, top_logprobs=3, stream=True):  # type: ignore[call-overload]
        if chunk.choices and chunk.choices[0].logprobs:
            streamed += chunk.choices[0].logprobs.content
    assert streamed == whole.choices[0].logprobs.content
    text = dict(model=name, prompt=PROMPT, temperature=0, max_tokens=8, logprobs=3)
    one = client.completions.create(**text).choices[0].logprobs  # type: ignore[call-overload]
    parts: dict[str, list[Any]] = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    for chunk in client.completions.create(**text, stream=True):  # type: ignore[call-overload]
        for key in parts:
            parts[key] += getattr(chunk.choices[0].logprobs, key)
    assert parts == {key: getattr(one, key) for key in parts}


def test_completion_echo_scores_the_prompt(client: openai.OpenAI, references) -> None:
    tokenizer, reference = references["smol"]
    ids = numerics.completion_ids(tokenizer, PROMPT)
    plain = client.completions.create(model="smol", prompt=PROMPT, temperature=0, max_tokens=4)
    reply = client.completions.create(model="smol", prompt=PROMPT, temperature=0, max_tokens=4, echo=True, logprobs=2)
    choice = reply.choices[0]
    assert choice.text == PROMPT + plain.choices[0].text
    assert (
        (reply.usage.prompt_tokens, reply.usage.completion_tokens)
        == (len(ids), 4)
        == (
            plain.usage.prompt_tokens,
            plain.usage.completion_tokens,
        )
    )
    lp = choice.logprobs
    assert len(lp.tokens) == len(ids) + 4 and "".join(lp.tokens) == choice.text
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(len(lp.tokens))]  # all ASCII
    expected = _reference(reference, ids)
    for i in range(1, len(ids)):
        assert lp.token_logprobs[i] == pytest.approx(float(expected[i - 1, ids[i]]), abs=2e-3)
        assert 2 <= len(lp.top_logprobs[i]) <= 3 and lp.top_logprobs[i][lp.tokens[i]] == lp.token_logprobs[i]
    # echo alone: the prompt's text, no logprobs; token IDs as the prompt; and streamed, in one first chunk
    assert (
        client.completions.create(model="smol", prompt=ids, max_tokens=4, temperature=0, echo=True).choices[0].text
        == tokenizer.decode(ids) + plain.choices[0].text
    )
    chunks = list(
        client.completions.create(model="smol", prompt=PROMPT, max_tokens=4, temperature=0, echo=True, stream=True)
    )
    assert chunks[0].choices[0].text == PROMPT and "".join(c.choices[0].text for c in chunks) == choice.text


def test_echo_with_no_new_tokens_scores_the_prompt(client: openai.OpenAI, server: LiveServer) -> None:
    """max_tokens 0 with echo (how evaluation harnesses score a text): the prompt alone, scored."""
    for stream in (False, True):
        args = dict(model="tiny", prompt=PROMPT, max_tokens=0, echo=True, logprobs=1)
        if stream:
            chunks = list(client.completions.create(**args, stream=True, stream_options={"include_usage": True}))  # type: ignore[call-overload]
            text = "".join(c.choices[0].text for c in chunks if c.choices)
            usage, reason = chunks[-1].usage, chunks[-2].choices[0].finish_reason
        else:
            reply = client.completions.create(**args)  # type: ignore[call-overload]
            text, usage, reason = reply.choices[0].text, reply.usage, reply.choices[0].finish_reason
            assert len(reply.choices[0].logprobs.tokens) == usage.prompt_tokens
        assert text == PROMPT and reason == "length" and usage.completion_tokens == 0 and usage.prompt_tokens > 1
    r = httpx.post(
        f"{server.url}/v1/completions", json={"model": "tiny", "prompt": PROMPT, "max_tokens": 0}, timeout=60
    )
    assert r.status_code == 400 and r.json()["error"]["param"] == "max_tokens", r.text


def test_echo_with_several_prompts_and_choices(client: openai.OpenAI) -> None:
    reply = client.completions.create(
        model="tiny", prompt=["hello world", "one two"], n=2, max_tokens=3, echo=True, logprobs=1, seed=5
    )
    assert [c.index for c in reply.choices] == [0, 1, 2, 3]
    for choice, prompt in zip(reply.choices, ["hello world", "hello world", "one two", "one two"], strict=True):
        assert choice.text.startswith(prompt) and choice.logprobs.token_logprobs[0] is None
        lp = choice.logprobs
        for token, offset in zip(lp.tokens, lp.text_offset, strict=True):  # offsets are in the text
            if token.startswith("bytes:"):
                break  # a random model's stray bytes: the characters after them start later than their tokens
            assert choice.text[offset:].startswith(token)
        assert lp.text_offset == sorted(lp.text_offset)
    assert reply.usage.completion_tokens == 4 * 3


def test_sampled_logprobs_are_the_raw_distribution(client: openai.OpenAI, references) -> None:
    """At temperature 0.3 the token is drawn from a sharpened distribution, but its reported
    logprob is the model's own (as OpenAI and vLLM report it)."""
    tokenizer, reference = references["tiny"]
    reply = client.chat.completions.create(
        model="tiny",
        messages=[{"role": "user", "content": QUESTION}],
        temperature=0.3,
        seed=1,
        max_tokens=8,
        logprobs=True,
    )
    content = reply.choices[0].logprobs.content
    table = _byte_ids(tokenizer)
    ids = numerics.chat_ids(tokenizer, QUESTION) + [table[bytes(e.bytes)] for e in content]
    expected = _reference(reference, ids)[-len(content) :]
    for entry, row, token in zip(content, expected, ids[-len(content) :], strict=True):
        assert entry.logprob == pytest.approx(float(row[token]), abs=2e-3) and entry.top_logprobs == []


def test_vllm_shapes(client: openai.OpenAI) -> None:
    """The cases vLLM's OpenAI-server tests check: top_logprobs 0 gives empty lists; completions'
    top_logprobs hold the chosen token beside the `logprobs` most likely ones."""
    messages = [{"role": "user", "content": "what is 1+1?"}]
    none = client.chat.completions.create(model="tiny", messages=messages, max_tokens=5, temperature=0, logprobs=False)
    assert none.choices[0].logprobs is None
    zero = client.chat.completions.create(
        model="tiny", messages=messages, max_tokens=5, temperature=0, logprobs=True, top_logprobs=0
    )
    assert zero.choices[0].logprobs.content and zero.choices[0].logprobs.content[0].top_logprobs == []
    for k in (0, 1, 5):
        lp = (
            client.completions.create(model="tiny", prompt=[5, 6, 7], max_tokens=5, temperature=0, logprobs=k)
            .choices[0]
            .logprobs
        )
        assert len(lp.tokens) == len(lp.token_logprobs) == 5
        assert all(max(k, 1) <= len(top) <= k + 1 for top in lp.top_logprobs)
    assert client.completions.create(model="tiny", prompt="x", max_tokens=2, logprobs=None).choices[0].logprobs is None
    for k in (0, 1):  # echo of a token-ID prompt: its decoded text first, every prompt token after the first scored
        choice = client.completions.create(
            model="tiny", prompt=[5, 6, 7, 8, 9], max_tokens=5, temperature=0, echo=True, logprobs=k
        ).choices[0]
        lp = choice.logprobs
        assert (
            len(lp.tokens) == len(lp.text_offset) == 10 and lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
        )
        assert all(max(k, 1) <= len(top) <= k + 1 for top in lp.top_logprobs[1:])


def test_errors_name_the_parameter(client: openai.OpenAI, server: LiveServer) -> None:
    messages = [{"role": "user", "content": "x"}]
    cases = [
        ("chat", {"messages": messages, "logprobs": True, "top_logprobs": 21}, "top_logprobs"),
        ("chat", {"messages": messages, "top_logprobs": 2}, "top_logprobs"),
        ("chat", {"messages": messages, "logprobs": 1}, "logprobs"),
        ("completions", {"prompt": "x", "logprobs": 6}, "logprobs"),
        ("completions", {"prompt": "x", "logprobs": -1}, "logprobs"),
        ("completions", {"prompt": "x", "echo": "yes"}, "echo"),
    ]
    for stream in (False, True):
        for route, body, param in cases:
            url = f"{server.url}/v1/{'chat/completions' if route == 'chat' else 'completions'}"
            r = httpx.post(url, json={"model": "tiny", "stream": stream, **body}, timeout=60)
            assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text
    # a backend that cannot: refused by name, before generating
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(model="fake", prompt="a b", echo=True)
    assert info.value.param == "echo" and info.value.code == "unsupported_parameter"
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model="fake", messages=messages, logprobs=True, stream=True)
    assert info.value.param == "logprobs" and info.value.code == "unsupported_parameter"

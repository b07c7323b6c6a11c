"""Log-probabilities through upstream deployments: our gateway in front of a second gateway process
serving a tiny Llama. Over the `openai` dialect chat `logprobs`/`top_logprobs` and completions
`logprobs`/`echo` pass through and come back as the second gateway answers them itself, streamed
and not; over the `tgi` dialect logprobs map to TGI's details and `echo` is refused by name."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pytest

from tests.helpers import LiveServer, gateway_process, settings_for
from tests.tiny_models import build_tiny_llama
from tests.upstream.conftest import upstream

SLOW_OK = {"timeouts": {"connect": 5, "per_try": 60, "total": 120}}
MESSAGES = [{"role": "user", "content": "hello world"}]
PROMPT = "the quick brown fox"


@pytest.fixture(scope="module")
def downstream(tmp_path_factory: pytest.TempPathFactory, cache_dir: str) -> Iterator[str]:
    folder = build_tiny_llama(tmp_path_factory.mktemp("tiny-llama"))
    backend = {"kind": "local", "source": str(folder), "dtype": "float32"}
    models = [{"name": "tiny", "task": "text-generation", "default": True, "backend": backend}]
    with gateway_process({"models": models, "cache_dir": cache_dir}, tmp_path_factory.mktemp("down")) as url:
        yield url


@pytest.fixture(scope="module")
def chain(downstream: str, cache_dir: str) -> Iterator[LiveServer]:
    models = [
        {"name": "oa", "task": "text-generation", "backend": upstream(f"{downstream}/v1", model="tiny", **SLOW_OK)},
        {"name": "tgi", "task": "text-generation", "backend": upstream(downstream, dialect="tgi", **SLOW_OK)},
    ]
    settings = settings_for(models)
    settings.cache_dir = Path(cache_dir)
    with LiveServer(settings) as server:
        server.wait_ready(120)
        yield server


def _client(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0, timeout=120)


def _choices(answer: Any) -> list[dict[str, Any]]:
    return [c.model_dump() for c in answer.choices]


def _streamed(chunks: Any, field: str) -> tuple[str, list[Any]]:
    """A stream's text and its logprobs entries (chat) or parallel lists (completions), joined."""
    text, entries = "", []
    for chunk in chunks:
        for c in chunk.choices:
            text += (c.delta.content or "") if field == "content" else c.text
            if c.logprobs is not None:
                lp = c.logprobs.model_dump()
                entries += lp["content"] if field == "content" else list(zip(*(lp[k] for k in sorted(lp)), strict=True))
    return text, entries


def _distinct(values: Any) -> list[float]:
    """The values, sorted, those within 1e-4 of the one before left out."""
    out: list[float] = []
    for value in sorted(values):
        if not out or value - out[-1] > 1e-4:
            out.append(value)
    return out


def test_openai_dialect_chat_logprobs_equal_the_upstreams(chain: LiveServer, downstream: str) -> None:
    args = dict(messages=MESSAGES, temperature=0, max_tokens=10, logprobs=True, top_logprobs=4)
    direct = _client(downstream).chat.completions.create(model="tiny", **args)  # type: ignore[call-overload]
    through = _client(chain.url).chat.completions.create(model="oa", **args)  # type: ignore[call-overload]
    assert _choices(through) == _choices(direct) and through.choices[0].logprobs.content
    counts = ("prompt_tokens", "completion_tokens", "total_tokens")
    assert [getattr(through.usage, k) for k in counts] == [getattr(direct.usage, k) for k in counts]
    # the upstream had this prompt from the direct call: its prefix-cache hit is passed through
    assert through.usage.prompt_tokens_details.cached_tokens > 0
    stream = _client(chain.url).chat.completions.create(model="oa", stream=True, **args)  # type: ignore[call-overload]
    text, entries = _streamed(stream, "content")
    assert text == direct.choices[0].message.content
    assert entries == direct.choices[0].logprobs.model_dump()["content"]


def test_openai_dialect_completion_echo_equal_the_upstreams(chain: LiveServer, downstream: str) -> None:
    args = dict(prompt=PROMPT, temperature=0, max_tokens=6, logprobs=2, echo=True)
    direct = _client(downstream).completions.create(model="tiny", **args)  # type: ignore[call-overload]
    through = _client(chain.url).completions.create(model="oa", **args)  # type: ignore[call-overload]
    assert _choices(through) == _choices(direct) and through.choices[0].text.startswith(PROMPT)
    assert through.usage == direct.usage and through.usage.completion_tokens == 6
    text, entries = _streamed(_client(chain.url).completions.create(model="oa", stream=True, **args), "text")  # type: ignore[call-overload]
    lp = direct.choices[0].logprobs.model_dump()
    assert text == direct.choices[0].text
    assert entries == list(zip(*(lp[k] for k in sorted(lp)), strict=True))
    scored = dict(prompt=PROMPT, max_tokens=0, logprobs=1, echo=True)  # the prompt alone, scored
    direct = _client(downstream).completions.create(model="tiny", **scored)  # type: ignore[call-overload]
    through = _client(chain.url).completions.create(model="oa", **scored)  # type: ignore[call-overload]
    assert _choices(through) == _choices(direct) and through.usage == direct.usage


def test_tgi_dialect_maps_logprobs_to_details(chain: LiveServer, downstream: str) -> None:
    args = dict(prompt=PROMPT, temperature=0, max_tokens=6, logprobs=2)
    direct = _client(downstream).completions.create(model="tiny", **args).choices[0]  # type: ignore[call-overload]
    through = _client(chain.url).completions.create(model="tgi", **args).choices[0]  # type: ignore[call-overload]
    assert through.text == direct.text
    # greedy, no penalties: TGI's logprob of each token is the model's own, as on the OpenAI route
    assert through.logprobs.token_logprobs == pytest.approx(direct.logprobs.token_logprobs, abs=1e-4)
    # TGI's top_tokens, keyed by the texts TGI gives (the chosen token's text is its share of the text)
    for mine, theirs in zip(through.logprobs.top_logprobs, direct.logprobs.top_logprobs, strict=True):
        assert _distinct(mine.values()) == pytest.approx(_distinct(theirs.values()), abs=1e-4)
    with pytest.raises(openai.BadRequestError) as info:
        _client(chain.url).completions.create(model="tgi", prompt=PROMPT, max_tokens=2, echo=True)
    assert info.value.param == "echo" and info.value.code == "unsupported_parameter"


def test_malformed_upstream_logprobs_are_an_upstream_error() -> None:
    """An upstream's logprobs that cannot be read are its fault (502), never a 500 of ours."""
    from gateway.errors import UpstreamError
    from gateway.upstream.dialects import OpenAIStream, openai_result

    bad = [
        {"content": [{"token": "a"}]},  # no logprob
        {"tokens": ["a", "b"], "token_logprobs": [None]},  # lists of different lengths
        {"content": [{"token": "a", "logprob": "x"}]},
    ]
    for logprobs in bad:
        with pytest.raises(UpstreamError):
            openai_result({"choices": [{"index": 0, "text": "ab", "logprobs": logprobs}]}, 1)
        with pytest.raises(UpstreamError):
            OpenAIStream().feed({"choices": [{"index": 0, "text": "ab", "logprobs": logprobs}]})
    good = {"content": [{"token": "bytes:\\xe3\\x81", "logprob": -1.0, "bytes": [227, 129], "top_logprobs": []}]}
    (event,) = OpenAIStream().feed({"choices": [{"index": 0, "delta": {"content": ""}, "logprobs": good}]})
    assert event.own is not None and event.own.raw == b"\xe3\x81" and event.logprob == -1.0

"""Our gateway in front of a second gateway process serving tiny random models (built here), over
each dialect: `tgi` (its /generate and /generate_stream), `hf` (its /models/{id}) and `openai`.
Every answer through the front gateway must be the one the second gateway gives directly."""

from __future__ import annotations

import io
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from huggingface_hub import InferenceClient

from tests.helpers import LiveServer, gateway_process, settings_for
from tests.hf.tiny_models import IMAGE_LABELS, build_gpt2, build_vit
from tests.upstream.conftest import sdk, upstream

PROMPT = "tell me about python"  # the tiny model answers it with visible tokens
TOKENS = 6
# The tiny models answer in milliseconds, but the first call of each warms it up on a busy CPU.
SLOW_OK = {"timeouts": {"connect": 5, "per_try": 60, "total": 120}}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny-chain")
    return {"gpt2": build_gpt2(root / "gpt2"), "vit": build_vit(root / "vit")}


def _local(folder: Path) -> dict[str, str]:
    return {"kind": "local", "source": str(folder), "dtype": "float32"}


@pytest.fixture(scope="module")
def downstream(tiny: dict[str, Path], tmp_path_factory: pytest.TempPathFactory, cache_dir: str) -> Iterator[str]:
    models = [
        {"name": "tiny-gpt2", "task": "text-generation", "default": True, "backend": _local(tiny["gpt2"])},
        {"name": "vit", "task": "image-classification", "backend": _local(tiny["vit"])},
    ]
    with gateway_process({"models": models, "cache_dir": cache_dir}, tmp_path_factory.mktemp("down")) as url:
        yield url


@pytest.fixture(scope="module")
def chain(downstream: str, tiny: dict[str, Path], cache_dir: str) -> Iterator[LiveServer]:
    models = [
        {
            "name": "tgi-gen",
            "task": "text-generation",
            "default": True,
            "backend": upstream(downstream, dialect="tgi", **SLOW_OK),
        },
        {
            "name": "hf-gen",
            "task": "text-generation",
            "backend": upstream(f"{downstream}/models/tiny-gpt2", dialect="hf", **SLOW_OK),
        },
        {
            "name": "oa-gen",
            "task": "text-generation",
            "backend": upstream(f"{downstream}/v1", model="tiny-gpt2", **SLOW_OK),
        },
        {
            "name": "vit",
            "task": "image-classification",
            "backend": upstream(f"{downstream}/models/vit", dialect="hf", **SLOW_OK),
        },
        {
            "name": "routed",
            "task": "text-generation",
            "deployments": [
                {"name": "remote", "backend": upstream(downstream, dialect="tgi", **SLOW_OK)},
                {"name": "local", "backend": _local(tiny["gpt2"])},
            ],
            "routing": {"fallback": ["local"]},
        },
    ]
    settings = settings_for(models)
    settings.cache_dir = Path(cache_dir)
    with LiveServer(settings) as server:
        server.wait_ready(120)
        yield server


def _events(url: str, body: dict[str, Any]) -> list[dict[str, Any]]:
    """The `data:` events of a TGI stream."""
    with httpx.stream("POST", url, json=body, timeout=60) as response:
        assert response.status_code == 200, response.read()
        return [json.loads(line[5:]) for line in response.iter_lines() if line.startswith("data:")]


GENERATE = {"inputs": PROMPT, "parameters": {"max_new_tokens": TOKENS}}


@pytest.fixture(scope="module")
def direct(downstream: str) -> dict[str, Any]:
    """What the second gateway answers itself: the text, and the tokens of its stream."""
    text = httpx.post(f"{downstream}/generate", json=GENERATE, timeout=60).json()["generated_text"]
    events = _events(f"{downstream}/generate_stream", GENERATE)
    assert text and len(events) == TOKENS
    return {"text": text, "tokens": [e["token"]["text"] for e in events]}


@pytest.mark.parametrize("model", ["tgi-gen", "hf-gen"])
def test_openai_completions_over_the_tgi_and_hf_dialects(chain, direct, model) -> None:
    client = sdk(chain, timeout=60)
    whole = client.completions.create(model=model, prompt=PROMPT, max_tokens=TOKENS, temperature=0)
    chunks = list(client.completions.create(model=model, prompt=PROMPT, max_tokens=TOKENS, temperature=0, stream=True))
    assert whole.choices[0].text == direct["text"]
    assert whole.choices[0].finish_reason == "length"
    # token by token (an OpenAI stream leaves out the tokens with no text of their own)
    assert [c.choices[0].text for c in chunks if c.choices] == [t for t in direct["tokens"] if t]
    assert chunks[-1].choices[0].finish_reason == "length"


def test_openai_chat_over_the_openai_dialect(chain, downstream) -> None:
    args = dict(messages=[{"role": "user", "content": PROMPT}], max_tokens=TOKENS, temperature=0)
    want = sdk(chain, timeout=60).chat.completions
    direct = httpx.post(f"{downstream}/v1/chat/completions", json={"model": "tiny-gpt2", **args}, timeout=60).json()
    got = want.create(model="oa-gen", **args).choices[0].message.content
    streamed = "".join(
        c.choices[0].delta.content or "" for c in want.create(model="oa-gen", stream=True, **args) if c.choices
    )
    assert got == streamed == direct["choices"][0]["message"]["content"] and got


def test_tgi_routes_of_the_front_gateway(chain, direct) -> None:
    """/generate, /generate_stream and InferenceClient's streaming serve the default model, a `tgi` upstream."""
    assert httpx.post(f"{chain.url}/generate", json=GENERATE, timeout=60).json()["generated_text"] == direct["text"]
    events = _events(f"{chain.url}/generate_stream", GENERATE)
    assert [e["token"]["text"] for e in events] == direct["tokens"]
    assert events[-1]["generated_text"] == direct["text"]
    client = InferenceClient(base_url=chain.url)  # held: a collected client closes its open streams
    assert list(client.text_generation(PROMPT, max_new_tokens=TOKENS, stream=True)) == direct["tokens"]


@pytest.mark.parametrize("model", ["tgi-gen", "hf-gen"])
def test_hf_model_route_of_the_front_gateway(chain, direct, model) -> None:
    url = f"{chain.url}/models/{model}"
    assert httpx.post(url, json=GENERATE, timeout=60).json() == [{"generated_text": direct["text"]}]
    events = _events(url, {**GENERATE, "stream": True})
    assert [e["token"]["text"] for e in events] == direct["tokens"]
    client = InferenceClient(base_url=url)
    assert list(client.text_generation(PROMPT, max_new_tokens=TOKENS, stream=True)) == direct["tokens"]
    last = list(client.text_generation(PROMPT, max_new_tokens=TOKENS, stream=True, details=True))[-1]
    assert last.generated_text == direct["text"] and last.details.generated_tokens == TOKENS


def _png() -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (40, 40), (200, 10, 10)).save(buf, "PNG")
    return buf.getvalue()


def test_image_classification_over_the_hf_dialect(chain, downstream) -> None:
    image = _png()
    want = httpx.post(f"{downstream}/models/vit", content=image, headers={"content-type": "image/png"}).json()
    raw = httpx.post(f"{chain.url}/models/vit", content=image, headers={"content-type": "image/png"}, timeout=60)
    assert raw.status_code == 200, raw.text
    assert raw.json() == want and sorted(o["label"] for o in want) == sorted(IMAGE_LABELS)
    out = InferenceClient(base_url=f"{chain.url}/models/vit").image_classification(image, top_k=1)
    assert [(o.label, o.score) for o in out] == [(want[0]["label"], pytest.approx(want[0]["score"]))]


def test_a_routed_model_keeps_its_local_engine_gauges(chain, direct) -> None:
    reply = sdk(chain, timeout=60).completions.create(model="routed", prompt=PROMPT, max_tokens=TOKENS, temperature=0)
    assert reply.choices[0].text == direct["text"]
    text = httpx.get(f"{chain.url}/metrics").text
    assert 'gateway_queue_depth{model="routed"} 0.0' in text
    assert 'gateway_running_requests{model="routed"} 0.0' in text


@pytest.mark.parametrize("model", ["tgi-gen", "hf-gen"])
def test_stop_sequences_keep_each_apis_rule_across_dialects(chain, downstream, direct, model) -> None:
    """TGI keeps a matched stop in its text, OpenAI drops it: a TGI upstream behind an OpenAI route is trimmed."""
    stop = direct["tokens"][2].strip() or direct["tokens"][2]  # a stop the tiny model is sure to produce
    kept = httpx.post(
        f"{downstream}/generate", json={"inputs": PROMPT, "parameters": {"max_new_tokens": TOKENS, "stop": [stop]}}
    ).json()["generated_text"]
    assert kept.endswith(stop)
    dropped = kept[: -len(stop)]
    client = sdk(chain, timeout=60)
    args = dict(model=model, prompt=PROMPT, max_tokens=TOKENS, temperature=0, stop=[stop])
    whole = client.completions.create(**args)
    streamed = "".join(c.choices[0].text for c in client.completions.create(stream=True, **args) if c.choices)
    assert whole.choices[0].text == streamed == dropped
    assert whole.choices[0].finish_reason == "stop"
    tgi = InferenceClient(base_url=f"{chain.url}/models/{model}")
    assert tgi.text_generation(PROMPT, max_new_tokens=TOKENS, stop=[stop]) == kept
    assert "".join(tgi.text_generation(PROMPT, max_new_tokens=TOKENS, stop=[stop], stream=True)) == kept


@pytest.mark.parametrize("model", ["tgi-gen", "hf-gen"])
def test_whole_answers_over_tgi_dialects_keep_usage_and_details(chain, downstream, model) -> None:
    """Not streamed, the prompt's tokens are counted (TGI's x-prompt-tokens header) and the HF route's
    details are the upstream's own, token for token."""
    args = dict(prompt=PROMPT, max_tokens=TOKENS, temperature=0)
    want = httpx.post(f"{downstream}/v1/completions", json={"model": "tiny-gpt2", **args}, timeout=60).json()["usage"]
    got = sdk(chain, timeout=60).completions.create(model=model, **args).usage
    assert want["prompt_tokens"] > 0
    assert got.model_dump(exclude_none=True) == want
    body = {"inputs": PROMPT, "parameters": {"max_new_tokens": TOKENS, "details": True}}
    direct = httpx.post(f"{downstream}/models/tiny-gpt2", json=body, timeout=60).json()[0]["details"]
    through = httpx.post(f"{chain.url}/models/{model}", json=body, timeout=60).json()[0]["details"]
    assert through["generated_tokens"] == direct["generated_tokens"] == TOKENS
    assert [(t["id"], t["text"], t["special"]) for t in through["tokens"]] == [
        (t["id"], t["text"], t["special"]) for t in direct["tokens"]
    ]
    assert [t["logprob"] for t in through["tokens"]] == pytest.approx(
        [t["logprob"] for t in direct["tokens"]], abs=1e-4
    )

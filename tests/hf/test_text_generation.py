"""TGI-compatible text generation and chat through InferenceClient, AsyncInferenceClient and OpenAI."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator

import orjson
import pytest
import requests
import uvicorn
from huggingface_hub import AsyncInferenceClient, InferenceClient
from huggingface_hub.errors import ValidationError
from openai import OpenAI
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from tests.helpers import LiveServer, free_port, settings_for


@pytest.fixture(params=["root", "model-url"])
def gen_url(request: pytest.FixtureRequest, hf_server: LiveServer) -> str:
    """The TGI-style base URL and the hosted-API per-model URL serve the same model."""
    return hf_server.url if request.param == "root" else f"{hf_server.url}/models/org/tiny-gpt2"


def test_text_generation_plain(gen_url: str) -> None:
    client = InferenceClient(base_url=gen_url)
    text = client.text_generation("Hello world", max_new_tokens=5)
    assert isinstance(text, str) and text
    assert client.text_generation("Hello world", max_new_tokens=5) == text  # greedy is deterministic
    full = client.text_generation("Hello world", max_new_tokens=5, return_full_text=True)
    assert full == "Hello world" + text


def test_text_generation_details(gen_url: str) -> None:
    client = InferenceClient(base_url=gen_url)
    out = client.text_generation("Hello world", max_new_tokens=4, details=True)
    d = out.details
    assert d.finish_reason == "length" and d.generated_tokens == 4 and len(d.tokens) == 4
    assert "".join(t.text for t in d.tokens) == out.generated_text
    assert all(isinstance(t.id, int) and t.logprob <= 0 and t.special is False for t in d.tokens)
    assert d.seed is None and d.prefill == []


def test_sampling_with_seed_is_reproducible(hf_server: LiveServer) -> None:
    client = InferenceClient(base_url=hf_server.url)
    kwargs = {"max_new_tokens": 8, "do_sample": True, "temperature": 1.5, "top_k": 50, "details": True}
    a = client.text_generation("Hello", seed=7, **kwargs)
    b = client.text_generation("Hello", seed=7, **kwargs)
    assert a.generated_text == b.generated_text and a.details.seed == 7
    assert [t.id for t in a.details.tokens] == [t.id for t in b.details.tokens]
    seeds = {client.text_generation("Hello", seed=s, **kwargs).details.tokens[0].id for s in range(8)}
    assert len(seeds) > 1  # different seeds sample different tokens
    unseeded = client.text_generation("Hello", **kwargs)
    assert isinstance(unseeded.details.seed, int)  # the seed the server drew is reported


def test_do_sample_false_is_greedy(hf_server: LiveServer) -> None:
    client = InferenceClient(base_url=hf_server.url)
    greedy = client.text_generation("Hello", max_new_tokens=6)
    forced = client.text_generation("Hello", max_new_tokens=6, do_sample=False, temperature=1.7, seed=3)
    assert forced == greedy


def _a_stop(client: InferenceClient) -> tuple[str, str]:
    """Greedy text for "Hello" and a word in it to use as a stop sequence."""
    free = client.text_generation("Hello", max_new_tokens=10, details=True)
    stop = next((t.text.strip() for t in free.details.tokens[1:] if t.text.strip()), None)
    assert stop, "the tiny model produced only blank tokens"
    return free.generated_text, stop


def test_stop_sequence_is_kept_as_tgi_does(hf_server: LiveServer) -> None:
    """TGI ends the text with the stop sequence it matched, on every HF/TGI route, streamed or not."""
    client = InferenceClient(base_url=hf_server.url)
    free, stop = _a_stop(client)
    kept = free[: free.index(stop) + len(stop)]
    out = client.text_generation("Hello", max_new_tokens=10, stop=[stop], details=True)
    assert out.generated_text == kept and out.details.finish_reason == "stop_sequence"
    assert "".join(t.text for t in out.details.tokens) == kept
    events = list(client.text_generation("Hello", max_new_tokens=10, stop=[stop], stream=True, details=True))
    assert "".join(e.token.text for e in events) == kept and events[-1].generated_text == kept
    assert events[-1].details.finish_reason == "stop_sequence"
    body = {"inputs": "Hello", "parameters": {"max_new_tokens": 10, "stop": [stop]}}
    for path in ("/", "/models/gpt2", "/pipeline/text-generation/gpt2"):
        assert requests.post(hf_server.url + path, json=body).json() == [{"generated_text": kept}], path
    assert requests.post(f"{hf_server.url}/generate", json=body).json() == {"generated_text": kept}
    scoped = InferenceClient(base_url=f"{hf_server.url}/models/org/tiny-gpt2")
    assert "".join(scoped.text_generation("Hello", max_new_tokens=10, stop=[stop], stream=True)) == kept


def test_stop_sequence_is_dropped_on_openai_routes(hf_server: LiveServer) -> None:
    free, stop = _a_stop(InferenceClient(base_url=hf_server.url))
    openai = OpenAI(base_url=f"{hf_server.url}/v1", api_key="unused")
    out = openai.completions.create(model="gpt2", prompt="Hello", max_tokens=10, stop=[stop], temperature=0)
    assert out.choices[0].text == free[: free.index(stop)] and out.choices[0].finish_reason == "stop"
    chunks = openai.completions.create(
        model="gpt2", prompt="Hello", max_tokens=10, stop=[stop], temperature=0, stream=True
    )
    assert "".join(c.choices[0].text for c in chunks if c.choices) == free[: free.index(stop)]


def test_stream_without_details(gen_url: str) -> None:
    client = InferenceClient(base_url=gen_url)
    pieces = list(client.text_generation("Hello world", max_new_tokens=6, stream=True))
    assert len(pieces) == 6 and all(isinstance(p, str) for p in pieces)
    assert "".join(pieces) == client.text_generation("Hello world", max_new_tokens=6)


def test_stream_with_details(hf_server: LiveServer) -> None:
    client = InferenceClient(base_url=hf_server.url)
    events = list(client.text_generation("Hello world", max_new_tokens=5, stream=True, details=True))
    assert [e.index for e in events] == [1, 2, 3, 4, 5]
    assert all(e.generated_text is None and e.details is None for e in events[:-1])
    last = events[-1]
    assert last.generated_text == "".join(e.token.text for e in events)
    assert last.details.finish_reason == "length" and last.details.generated_tokens == 5
    assert last.details.input_length > 0


def test_stream_wire_format(hf_server: LiveServer) -> None:
    with requests.post(
        f"{hf_server.url}/generate_stream", json={"inputs": "Hello", "parameters": {"max_new_tokens": 3}}, stream=True
    ) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in r.iter_lines(decode_unicode=True) if line]
    assert len(lines) == 3 and all(line.startswith("data:") for line in lines)  # one JSON line per token, no [DONE]


def test_async_streaming(hf_server: LiveServer) -> None:
    async def main() -> tuple[list[str], str]:
        client = AsyncInferenceClient(base_url=hf_server.url)
        stream = await client.text_generation("Hello world", max_new_tokens=4, stream=True)
        pieces = [piece async for piece in stream]
        details_stream = await client.text_generation("Hello world", max_new_tokens=4, stream=True, details=True)
        events = [e async for e in details_stream]
        return pieces, events[-1].generated_text

    pieces, final = asyncio.run(main())
    assert len(pieces) == 4 and "".join(pieces) == final


def test_async_text_generation_and_chat(hf_server: LiveServer) -> None:
    """AsyncInferenceClient without streaming: the same answers as the sync client."""
    messages = [{"role": "user", "content": "Hello"}]

    async def main() -> tuple[str, object, object, list[str]]:
        client = AsyncInferenceClient(base_url=f"{hf_server.url}/models/gpt2")
        text = await client.text_generation("Hello world", max_new_tokens=5)
        details = await client.text_generation("Hello world", max_new_tokens=5, details=True)
        chat = await client.chat_completion(messages, max_tokens=4, temperature=0)
        stream = await client.chat_completion(messages, max_tokens=4, temperature=0, stream=True)
        return text, details, chat, [c.choices[0].delta.content or "" async for c in stream if c.choices]

    text, details, chat, pieces = asyncio.run(main())
    sync = InferenceClient(base_url=f"{hf_server.url}/models/gpt2")
    assert text == sync.text_generation("Hello world", max_new_tokens=5) and text
    assert details.generated_text == text and details.details.generated_tokens == 5
    expected = sync.chat_completion(messages, max_tokens=4, temperature=0)
    assert chat.choices[0].message.content == expected.choices[0].message.content
    assert chat.usage.completion_tokens == 4 and chat.choices[0].finish_reason == "length"
    assert "".join(pieces) == chat.choices[0].message.content


def test_generate_and_compat_shapes(hf_server: LiveServer) -> None:
    body = {"inputs": "Hello", "parameters": {"max_new_tokens": 2}}
    obj = requests.post(f"{hf_server.url}/generate", json=body).json()
    listed = requests.post(f"{hf_server.url}/", json=body).json()
    hosted = requests.post(f"{hf_server.url}/models/gpt2", json=body).json()
    assert set(obj) == {"generated_text"} and listed == [obj] and hosted == [obj]
    batch = requests.post(f"{hf_server.url}/models/gpt2", json={**body, "inputs": ["Hello", "The future"]}).json()
    assert len(batch) == 2 and batch[0] == obj


@pytest.mark.parametrize(
    ("parameters", "named"),
    [
        ({"best_of": 2}, "best_of"),
        ({"watermark": True}, "watermark"),
        ({"grammar": {"type": "xml", "value": "<a/>"}}, "grammar"),
        ({"top_n_tokens": 6}, "top_n_tokens"),
        ({"temperature": 0}, "temperature"),
        ({"max_new_tokenz": 2}, "max_new_tokenz"),
        ({"stop": ["a", "b", "c", "d", "e"]}, "stop"),
    ],
)
def test_unsupported_parameters_raise_validation_error(
    hf_server: LiveServer, parameters: dict[str, object], named: str
) -> None:
    client = InferenceClient(base_url=hf_server.url)
    r = requests.post(hf_server.url, json={"inputs": "Hello", "parameters": parameters})
    assert r.status_code == 422 and r.json()["error_type"] == "validation" and named in r.json()["error"]
    assert "model_kwargs" not in r.text
    if named in ("best_of", "watermark", "top_n_tokens", "temperature"):
        with pytest.raises(ValidationError, match=named):
            client.text_generation("Hello", **parameters)  # type: ignore[arg-type]


def test_prompt_too_long_is_a_validation_error(hf_server: LiveServer) -> None:
    with pytest.raises(ValidationError):
        InferenceClient(base_url=hf_server.url).text_generation("hello " * 700, max_new_tokens=2)
    r = requests.post(hf_server.url, json={"inputs": "hello " * 700, "stream": True})
    assert r.status_code == 422 and r.headers["content-type"].startswith("application/json")


def test_chat_completion_via_base_url(gen_url: str) -> None:
    client = InferenceClient(base_url=gen_url)  # sends "model": "dummy"
    messages = [{"role": "user", "content": "Hello"}]
    out = client.chat_completion(messages, max_tokens=4, seed=5)
    choice = out.choices[0]
    assert choice.message.role == "assistant" and choice.finish_reason == "length"
    assert out.usage.completion_tokens == 4
    chunks = list(client.chat_completion(messages, max_tokens=4, stream=True, seed=5))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == choice.message.content


def test_openai_client_with_model_tgi(hf_server: LiveServer) -> None:
    client = OpenAI(base_url=f"{hf_server.url}/v1/", api_key="unused")
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello"}]
    response = client.chat.completions.create(model="tgi", messages=messages, temperature=0.7, max_tokens=5, seed=1)
    assert response.choices[0].finish_reason in ("length", "stop") and response.usage.completion_tokens <= 5
    stream = client.chat.completions.create(model="tgi", messages=messages, max_tokens=5, stream=True, temperature=0)
    text = "".join(chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices)
    greedy = client.chat.completions.create(model="tgi", messages=messages, max_tokens=5, temperature=0)
    assert text == greedy.choices[0].message.content


def test_chat_under_a_model_url_uses_that_model(hf_server: LiveServer) -> None:
    r = requests.post(
        f"{hf_server.url}/models/acme/sentiment/v1/chat/completions",
        json={"model": "dummy", "messages": [{"role": "user", "content": "hi"}]},
    )
    # the URL's model is a classifier: an OpenAI-shaped error, not the default chat model
    assert r.status_code == 400 and r.json()["error"]["code"] == "task_not_supported"


def test_health_and_info(hf_server: LiveServer) -> None:
    root = InferenceClient(base_url=hf_server.url, provider="hf-inference")
    assert root.health_check() is True
    info = root.get_endpoint_info()
    assert info["model_id"] == "gpt2" and info["max_total_tokens"] == 512 and info["model_dtype"] == "float32"
    scoped = InferenceClient(base_url=f"{hf_server.url}/models/acme/sentiment", provider="hf-inference")
    assert scoped.health_check() is True
    assert scoped.get_endpoint_info()["model_pipeline_tag"] == "text-classification"
    r = requests.get(f"{hf_server.url}/models/no-such/info")
    assert r.status_code == 404 and r.json()["error_type"] == "not_found"


def test_decoder_input_details_prefill_logprobs(hf_server: LiveServer, tiny: dict) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    prompt = "The future of AI is"
    out = InferenceClient(base_url=hf_server.url).text_generation(
        prompt, max_new_tokens=2, details=True, decoder_input_details=True
    )
    prefill = out.details.prefill
    tok = AutoTokenizer.from_pretrained(tiny["gpt2"])
    model = AutoModelForCausalLM.from_pretrained(tiny["gpt2"]).eval()
    ids = tok(prompt)["input_ids"]
    assert [p.id for p in prefill] == ids and "".join(p.text for p in prefill) == prompt
    with torch.no_grad():
        logprobs = torch.log_softmax(model(torch.tensor([ids])).logits[0], -1)
    assert prefill[0].logprob is None
    for i in range(1, len(ids)):
        assert prefill[i].logprob == pytest.approx(float(logprobs[i - 1, ids[i]]), abs=1e-4)


def test_truncate_keeps_the_last_prompt_tokens(hf_server: LiveServer) -> None:
    client = InferenceClient(base_url=hf_server.url)
    out = client.text_generation(
        "The future of AI is", max_new_tokens=3, truncate=2, details=True, decoder_input_details=True
    )
    assert len(out.details.prefill) == 2
    tail = "".join(p.text for p in out.details.prefill)
    assert "The future of AI is".endswith(tail)
    assert out.generated_text == client.text_generation(tail, max_new_tokens=3)
    with pytest.raises(ValidationError, match="streaming"):
        list(client.text_generation("Hello", max_new_tokens=2, stream=True, details=True, decoder_input_details=True))


def test_end_of_sequence_finish_reason(fake_server: LiveServer) -> None:
    """The fake model ends (EOS) once it has echoed the prompt: TGI says eos_token, OpenAI says stop."""
    client = InferenceClient(base_url=f"{fake_server.url}/models/fake/chat")
    out = client.text_generation("one two three", max_new_tokens=10, details=True)
    assert out.generated_text == "one two three"
    assert out.details.finish_reason == "eos_token" and out.details.generated_tokens == 3
    events = list(client.text_generation("one two three", max_new_tokens=10, details=True, stream=True))
    assert events[-1].details.finish_reason == "eos_token" and events[-1].details.input_length == 3
    chat = OpenAI(base_url=f"{fake_server.url}/v1", api_key="x").chat.completions.create(
        model="fake-chat", messages=[{"role": "user", "content": "one two"}], max_tokens=10, temperature=0
    )
    assert chat.choices[0].finish_reason == "stop"


def test_top_n_tokens(hf_server: LiveServer) -> None:
    client = InferenceClient(base_url=hf_server.url)
    out = client.text_generation("Hello world", max_new_tokens=4, details=True, top_n_tokens=3)
    tops = out.details.top_tokens
    assert len(tops) == 4 and all(len(step) == 3 for step in tops)
    for token, step in zip(out.details.tokens, tops, strict=True):  # the client leaves these as dicts
        assert [t["logprob"] for t in step] == sorted((t["logprob"] for t in step), reverse=True)
        # greedy with no penalties picks the most likely token, with the same log-probability
        assert step[0]["id"] == token.id and step[0]["logprob"] == pytest.approx(token.logprob, abs=1e-5)
    events = list(client.text_generation("Hello world", max_new_tokens=4, stream=True, details=True, top_n_tokens=2))
    assert all(len(e.top_tokens) == 2 and e.top_tokens[0].id == e.token.id for e in events)
    plain = client.text_generation("Hello world", max_new_tokens=4, details=True)
    assert plain.details.top_tokens is None


class _VLLMUpstream:
    """An OpenAI-compatible completions upstream that stops the way vLLM does: the stop string is
    dropped from the text and named in `stop_reason`. It answers "Hello from the upstream"."""

    TEXT = "Hello from the upstream"

    def __init__(self) -> None:
        self.stops: list[list[str]] = []
        app = Starlette(
            routes=[
                Route("/v1/completions", self.completions, methods=["POST"]),
                Route("/v1/models", lambda _: JSONResponse({"data": []})),
            ]
        )
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(uvicorn.Config(app, port=self.port, log_level="error", lifespan="off"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    async def completions(self, request: Request) -> Response:
        body = orjson.loads(await request.body())
        self.stops.append(body.get("stop"))
        text, reason, matched = self.TEXT, "length", None
        hits = [(text.find(s), s) for s in body.get("stop") or () if s in text]
        if hits:
            at, matched = min(hits)
            text, reason = text[:at], "stop"
        last = {"index": 0, "text": "" if body.get("stream") else text, "finish_reason": reason, "stop_reason": matched}
        if not body.get("stream"):
            return JSONResponse({"id": "x", "choices": [last], "usage": {}})
        chunks = [{"index": 0, "text": text, "finish_reason": None}, last]
        events = b"".join(b"data: " + orjson.dumps({"id": "x", "choices": [c]}) + b"\n\n" for c in chunks)
        return Response(events + b"data: [DONE]\n\n", media_type="text/event-stream")


@pytest.fixture
def vllm() -> Iterator[_VLLMUpstream]:
    upstream = _VLLMUpstream()
    upstream.thread.start()
    while not upstream.server.started:
        time.sleep(0.01)
    yield upstream
    upstream.server.should_exit = True
    upstream.thread.join(timeout=10)


def test_stop_sequence_kept_through_an_openai_upstream(vllm: _VLLMUpstream) -> None:
    """An OpenAI-style upstream drops the stop; a TGI route puts back the one the upstream names."""
    model = {
        "name": "up",
        "task": "text-generation",
        "default": True,
        "backend": {"kind": "upstream", "url": f"{vllm.url}/v1"},
    }
    with LiveServer(settings_for([model])) as gw:
        gw.wait_ready()
        client = InferenceClient(base_url=gw.url)
        assert client.text_generation("Say", max_new_tokens=8, stop=[" the"]) == "Hello from the"
        assert "".join(client.text_generation("Say", max_new_tokens=8, stop=[" the"], stream=True)) == "Hello from the"
        out = client.text_generation("Say", max_new_tokens=8, stop=["zzz"], details=True)
        assert out.generated_text == "Hello from the upstream" and out.details.finish_reason == "length"
        sdk = OpenAI(base_url=f"{gw.url}/v1", api_key="unused")
        assert (
            sdk.completions.create(model="up", prompt="Say", max_tokens=8, stop=[" the"]).choices[0].text
            == "Hello from"
        )
    assert vllm.stops == [[" the"], [" the"], ["zzz"], [" the"]]

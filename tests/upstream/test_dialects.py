"""TGI's native API and HF per-task endpoints as upstreams, translated to and from OpenAI."""

from __future__ import annotations

import asyncio
import base64

import httpx
import openai
import pytest
from huggingface_hub import InferenceClient
from pydantic import ValidationError

from gateway.backends.upstream import UpstreamBackend
from gateway.config import ModelSpec, Settings
from gateway.domain import Task, TaskRequest
from gateway.errors import InvalidRequest, TaskNotSupported
from tests.upstream.conftest import front, sdk, upstream


def test_tgi_stream_becomes_openai_chunks(fault) -> None:
    model = {"name": "t", "task": "text-generation", "backend": upstream(fault.url, dialect="tgi")}
    with front([model]) as gw:
        chunks = list(sdk(gw).completions.create(model="t", prompt="Say", max_tokens=4, temperature=0, stream=True))
        whole = sdk(gw).completions.create(model="t", prompt="Say", max_tokens=4, temperature=0.7, seed=3)
    assert [c.choices[0].text for c in chunks if c.choices] == ["Hello", " from", " the", " upstream"]
    assert chunks[-1].choices[0].finish_reason == "stop"  # TGI's eos_token
    assert whole.choices[0].text == "Hello from the upstream"
    assert whole.choices[0].finish_reason == "length"
    assert fault.hits["/generate_stream"] == 1 and fault.hits["/generate"] == 1
    greedy, sampled = fault.bodies
    assert greedy == {
        "inputs": "Say",
        "parameters": {"details": True, "return_full_text": False, "do_sample": False, "max_new_tokens": 4},
    }
    assert sampled["parameters"]["temperature"] == 0.7 and sampled["parameters"]["seed"] == 3


def test_tgi_deployment_refuses_chat_clearly(fault) -> None:
    model = {"name": "t", "task": "text-generation", "backend": upstream(fault.url, dialect="tgi")}
    with front([model]) as gw:
        with pytest.raises(openai.BadRequestError) as info:
            sdk(gw).chat.completions.create(model="t", messages=[{"role": "user", "content": "hi"}])
    assert info.value.param == "messages"
    assert fault.hits["/generate"] == 0


def test_hf_endpoint_text_generation_and_embeddings(fault) -> None:
    models = [
        {"name": "g", "task": "text-generation", "backend": upstream(f"{fault.url}/hf/model", dialect="hf")},
        {"name": "e", "task": "feature-extraction", "backend": upstream(f"{fault.url}/hf/model", dialect="hf")},
    ]
    with front(models) as gw:
        client = sdk(gw)
        assert (
            client.completions.create(model="g", prompt="x", max_tokens=4).choices[0].text == "Hello from the upstream"
        )
        parts = [c.choices[0].text for c in client.completions.create(model="g", prompt="x", max_tokens=4, stream=True)]
        vectors = client.embeddings.create(model="e", input=["abc", "de"], encoding_format="float")
    assert "".join(parts) == "Hello from the upstream"
    assert [d.embedding for d in vectors.data] == [[3.0, 1.0], [2.0, 1.0]]
    assert fault.bodies[1]["stream"] is True and fault.bodies[0]["stream"] is False


def _backend(url: str, dialect: str) -> UpstreamBackend:
    spec = ModelSpec.model_validate(
        {"name": "c", "task": "text-classification", "backend": upstream(url, dialect=dialect)}
    )
    return UpstreamBackend(spec, spec.backend)


def test_task_routes_post_inputs_and_parameters_to_the_model_url(fault) -> None:
    model = {
        "name": "c",
        "task": "text-classification",
        "backend": upstream(f"{fault.url}/hf/classifier", dialect="hf"),
    }
    with front([model]) as gw:
        one = httpx.post(f"{gw.url}/models/c", json={"inputs": "I like it", "parameters": {"top_k": 1}})
        two = InferenceClient(base_url=f"{gw.url}/models/c").text_classification("so so")
    assert one.status_code == 200
    assert one.json() == [[{"label": "POSITIVE", "score": 0.9, "echo": "I like it"}]]
    assert [(o.label, o.score) for o in two] == [("POSITIVE", 0.9)]
    assert fault.bodies[0] == {"inputs": ["I like it"], "parameters": {"top_k": 1}}


def test_images_go_to_an_hf_endpoint_as_base64(fault) -> None:
    """The hosted API takes an image as a base64 string in `inputs`, one image per call."""
    image, other = b"\x89PNG\r\n\x1a\n-one", b"\x89PNG\r\n\x1a\n-two"
    model = {
        "name": "v",
        "task": "image-classification",
        "backend": upstream(f"{fault.url}/hf/classifier", dialect="hf"),
    }
    with front([model]) as gw:
        raw = httpx.post(f"{gw.url}/models/v", content=image, headers={"content-type": "image/png"})
        encoded = [base64.b64encode(i).decode() for i in (image, other)]
        both = httpx.post(f"{gw.url}/models/v", json={"inputs": encoded, "parameters": {"top_k": 2}})
    assert raw.status_code == 200, raw.text
    assert raw.json() == [{"label": "POSITIVE", "score": 0.9, "echo": encoded[0]}]
    assert both.status_code == 200, both.text
    assert both.json() == [[{"label": "POSITIVE", "score": 0.9, "echo": e}] for e in encoded]
    assert fault.bodies[0] == {"inputs": encoded[0]}
    assert sorted(b["inputs"] for b in fault.bodies[1:]) == sorted(encoded)
    assert all(b["parameters"] == {"top_k": 2} for b in fault.bodies[1:])


def test_a_body_that_cannot_be_json_is_a_client_error_not_a_500(fault) -> None:
    async def call() -> None:
        backend = _backend(f"{fault.url}/hf/classifier", "hf")
        await backend.start()
        try:
            await backend.run_task(TaskRequest(Task.TEXT_CLASSIFICATION, [{"a", "set"}]))
        finally:
            await backend.close()

    with pytest.raises(InvalidRequest, match="cannot be sent"):
        asyncio.run(call())
    assert fault.hits["/hf/classifier"] == 0


def test_run_task_on_an_openai_upstream_is_not_supported(fault) -> None:
    async def call() -> None:
        backend = _backend(f"{fault.url}/v1", "openai")
        await backend.start()
        try:
            await backend.run_task(TaskRequest(Task.TEXT_CLASSIFICATION, "x"))
        finally:
            await backend.close()

    with pytest.raises(TaskNotSupported):
        asyncio.run(call())


@pytest.mark.parametrize(
    "model, message",
    [
        ({"name": "m"}, "exactly one of"),
        (
            {"name": "m", "backend": {"kind": "fake"}, "deployments": [{"name": "a", "backend": {"kind": "fake"}}]},
            "exactly one of",
        ),
        (
            {"name": "m", "deployments": [{"name": "a", "backend": {"kind": "fake"}}], "routing": {"fallback": ["b"]}},
            "unknown deployments",
        ),
        ({"name": "m", "deployments": [{"name": "a", "backend": {"kind": "fake"}}] * 2}, "unique"),
        ({"name": "m", "backend": {"kind": "upstream", "url": "http://user:pw@host/v1"}}, "credentials"),
        ({"name": "m", "backend": {"kind": "upstream", "url": "file:///etc/passwd"}}, "http"),
        ({"name": "m", "backend": {"kind": "upstream", "url": "http://h", "dialect": "grpc"}}, "dialect"),
    ],
)
def test_config_validation(model, message) -> None:
    with pytest.raises(ValidationError, match=message):
        Settings(models=[model])


def test_tgi_whole_answer_counts_the_prompt_and_fills_details(fault) -> None:
    """TGI's non-streamed details have no input length: the prompt's size comes from its x-prompt-tokens
    header, and the HF route's details from its tokens (they were 0 and [] before)."""
    model = {"name": "t", "task": "text-generation", "backend": upstream(fault.url, dialect="tgi")}
    with front([model]) as gw:
        whole = sdk(gw).completions.create(model="t", prompt="one two three", max_tokens=4, temperature=0)
        client = InferenceClient(base_url=f"{gw.url}/models/t")
        out = client.text_generation("one two three", max_new_tokens=4, details=True)
        top = httpx.post(
            f"{gw.url}/models/t",
            json={
                "inputs": "a b",
                "parameters": {"max_new_tokens": 4, "details": True, "top_n_tokens": 2, "truncate": 7},
            },
        )
    assert (whole.usage.prompt_tokens, whole.usage.completion_tokens, whole.usage.total_tokens) == (3, 4, 7)
    assert whole.usage.prompt_tokens_details.cached_tokens == 0
    assert out.generated_text == "Hello from the upstream"
    assert out.details.generated_tokens == 4 and out.details.finish_reason == "length"
    assert [(t.id, t.text, t.logprob) for t in out.details.tokens] == [
        (0, "Hello", pytest.approx(-0.1)),
        (1, " from", pytest.approx(-0.2)),
        (2, " the", pytest.approx(-0.3)),
        (3, " upstream", pytest.approx(-0.4)),
    ]
    # top_n_tokens and truncate reach TGI (they were dropped) and its top tokens come back
    assert fault.bodies[-1]["parameters"]["top_n_tokens"] == 2 and fault.bodies[-1]["parameters"]["truncate"] == 7
    details = top.json()[0]["details"]
    assert [[t["id"] for t in step] for step in details["top_tokens"]] == [[0, 1], [1, 2], [2, 3], [3, 4]]
    assert top.headers["x-prompt-tokens"] == "2" and top.headers["x-generated-tokens"] == "4"


def test_tgi_deployment_refuses_what_it_cannot_carry(fault) -> None:
    """TGI's API has no presence penalty: a 400 naming it, never silently dropped."""
    models = [
        {"name": "t", "task": "text-generation", "backend": upstream(fault.url, dialect="tgi")},
        {"name": "o", "task": "text-generation", "backend": upstream(f"{fault.url}/v1")},
    ]
    with front(models) as gw:
        for stream in (False, True):
            with pytest.raises(openai.BadRequestError) as info:
                sdk(gw).completions.create(model="t", prompt="x", max_tokens=2, presence_penalty=0.5, stream=stream)
            assert info.value.param == "presence_penalty" and info.value.code == "unsupported_parameter"
        assert sdk(gw).completions.create(model="t", prompt="x", max_tokens=2, presence_penalty=0).choices
        # an OpenAI-compatible upstream has no field for TGI's top_n_tokens or truncate: refused in HF's shape
        for parameter in ({"top_n_tokens": 2}, {"truncate": 3}):
            r = httpx.post(f"{gw.url}/models/o", json={"inputs": "x", "parameters": {"max_new_tokens": 2, **parameter}})
            assert r.status_code == 422 and r.json()["error_type"] == "validation", r.text
    assert fault.hits["/generate"] == 1 and fault.hits["/generate_stream"] == 0
    assert fault.hits["/v1/completions"] == 0


def test_prompt_logprobs_an_upstream_cannot_give_are_refused_before_generating(fault) -> None:
    """No upstream dialect returns TGI's prefill: decoder_input_details is a 422 naming it, decided from
    the backend's capabilities before any request reaches the upstream (not after a whole answer)."""
    models = [
        {"name": "t", "task": "text-generation", "backend": upstream(fault.url, dialect="tgi")},
        {"name": "o", "task": "text-generation", "backend": upstream(f"{fault.url}/v1")},
    ]
    body = {"inputs": "x", "parameters": {"max_new_tokens": 2, "details": True, "decoder_input_details": True}}
    with front(models) as gw:
        for name in ("t", "o"):
            r = httpx.post(f"{gw.url}/models/{name}", json=body)
            assert r.status_code == 422 and "decoder_input_details" in r.json()["error"], r.text
    assert fault.hits["/generate"] == 0 and fault.hits["/v1/completions"] == 0

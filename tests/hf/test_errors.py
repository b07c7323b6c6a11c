"""Bad input gets a JSON-object error in the HF shape with a fitting status; never a 500 or a hang."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator

import openai
import pytest
import requests
from huggingface_hub import InferenceClient
from huggingface_hub.errors import GenerationError, HfHubHTTPError, ValidationError
from openai import OpenAI

from gateway.backends.base import GenerationEvent
from gateway.backends.fake import FakeBackend
from gateway.backends.registry import default_backend_factory
from gateway.config import ModelSpec, Settings
from gateway.domain import GenerationRequest, TokenDelta
from gateway.errors import BackendFailure
from tests.helpers import LiveServer, settings_for


def _error(r: requests.Response, status: int, error_type: str, *words: str) -> None:
    body = r.json()
    assert r.status_code == status, r.text
    assert isinstance(body, dict) and body["error_type"] == error_type
    for word in words:
        assert word in body["error"]
    assert "model_kwargs" not in r.text


@pytest.mark.parametrize(
    ("path", "kwargs", "status", "error_type", "words"),
    [
        ("/models/no/such-model", {"json": {"inputs": "x"}}, 404, "not_found", ["no/such-model"]),
        ("/models/acme/sentiment", {"data": b""}, 422, "validation", ["empty"]),
        (
            "/models/acme/sentiment",
            {"data": b"{oops", "headers": {"content-type": "application/json"}},
            422,
            "validation",
            ["JSON"],
        ),
        ("/models/acme/sentiment", {"json": {"inputs": 3}}, 422, "validation", ["inputs"]),
        ("/models/acme/sentiment", {"json": {"inputs": ["a", ""]}}, 422, "validation", ["empty"]),
        ("/models/acme/sentiment", {"json": {"inputs": "x", "parameters": {"top_k": 0}}}, 422, "validation", ["top_k"]),
        (
            "/models/acme/sentiment",
            {"json": {"inputs": "x", "parameters": {"temperature": 1}}},
            422,
            "validation",
            ["temperature"],
        ),
        (
            "/models/acme/sentiment",
            {"json": {"inputs": "x", "options": {"wait_for_model": "soon"}}},
            422,
            "validation",
            ["wait_for_model"],
        ),
        ("/models/acme/sentiment", {"json": {"inputs": "x", "extra": 1}}, 422, "validation", ["extra"]),
        ("/models/acme/sentiment", {"json": {"inputs": "word " * 300}}, 200, None, []),  # truncated, as hosted
        ("/models/mlm", {"json": {"inputs": "word " * 300 + "[MASK]"}}, 422, "validation", ["at most 128"]),
        ("/models/qa", {"json": {"inputs": {"question": "who?"}}}, 422, "validation", ["context"]),
        (
            "/models/all-minilm-l6-v2",
            {"json": {"inputs": {"source_sentence": "a", "sentences": [1]}}},
            422,
            "validation",
            ["sentences"],
        ),
        (
            "/models/all-minilm-l6-v2",
            {"json": {"inputs": "a", "prompt_name": "query"}},
            422,
            "validation",
            ["prompt_name"],
        ),
        (
            "/models/bart-summarizer",
            {"json": {"inputs": "x", "parameters": {"generate_parameters": {"max_new_tokens": 4000}}}},
            422,
            "validation",
            ["max_new_tokens"],
        ),
        ("/models/vit", {"json": {"inputs": "x", "parameters": {"top_k": "many"}}}, 422, "validation", ["top_k"]),
        ("/models/gpt2", {"json": {"inputs": ""}}, 422, "validation", ["empty"]),
        ("/models/gpt2", {"json": {"inputs": ["a", "b"], "stream": True}}, 422, "validation", ["single prompt"]),
        ("/models/gpt2", {"json": {"inputs": "a", "stream": "yes"}}, 422, "validation", ["stream"]),
        ("/generate", {"data": b"not json"}, 422, "validation", ["JSON"]),
    ],
)
def test_bad_requests(
    hf_server: LiveServer, path: str, kwargs: dict, status: int, error_type: str | None, words: list[str]
) -> None:
    r = requests.post(hf_server.url + path, timeout=60, **kwargs)
    if status == 200:
        assert r.status_code == 200, r.text
        return
    _error(r, status, error_type, *words)


def test_hf_client_maps_errors(hf_server: LiveServer) -> None:
    with pytest.raises(ValidationError):
        InferenceClient(base_url=hf_server.url).text_generation("", max_new_tokens=2)
    with pytest.raises(HfHubHTTPError) as info:
        InferenceClient(base_url=f"{hf_server.url}/models/nope").text_classification("x")
    assert info.value.response.status_code == 404


class _FailingBackend(FakeBackend):
    """Streams two tokens, then fails: the error must arrive in-band after them."""

    async def generate_stream(self, request: GenerationRequest) -> AsyncIterator[GenerationEvent]:
        yield TokenDelta(0, "one", 1, -0.1)
        yield TokenDelta(0, " two", 2, -0.2)
        raise BackendFailure("the device fell over")


@pytest.fixture(scope="module")
def failing_server() -> Iterator[LiveServer]:
    def factory(spec: ModelSpec, settings: Settings):  # noqa: ANN202
        return _FailingBackend(spec) if spec.name == "broken" else default_backend_factory(spec, settings)

    models = [{"name": "broken", "task": "text-generation", "default": True, "backend": {"kind": "fake"}}]
    with LiveServer(settings_for(models), backend_factory=factory) as server:
        server.wait_ready()
        yield server


def test_error_inside_a_stream(failing_server: LiveServer) -> None:
    client = InferenceClient(base_url=failing_server.url)
    seen = []
    with pytest.raises(GenerationError, match="fell over"):
        for piece in client.text_generation("hi", max_new_tokens=5, stream=True):
            seen.append(piece)
    assert seen == ["one", " two"]
    with requests.post(f"{failing_server.url}/generate_stream", json={"inputs": "hi"}, stream=True) as r:
        lines = [line for line in r.iter_lines(decode_unicode=True) if line]
    assert lines[-1].startswith("data:") and '"error_type":"generation"' in lines[-1]


def test_error_inside_a_chat_stream_reaches_both_clients(failing_server: LiveServer) -> None:
    """The in-band error of an OpenAI stream carries `error_type`: the HF client raises its
    GenerationError (not UnknownError) after the chunks made before it; the OpenAI SDK an APIError."""
    messages = [{"role": "user", "content": "hi"}]
    client = InferenceClient(base_url=f"{failing_server.url}/models/broken")
    seen = []
    with pytest.raises(GenerationError, match="fell over"):
        for chunk in client.chat_completion(messages, max_tokens=5, stream=True):
            seen.append(chunk.choices[0].delta.content)
    assert seen == ["one", " two"]
    sdk = OpenAI(base_url=f"{failing_server.url}/v1", api_key="unused", max_retries=0)
    parts = []
    with pytest.raises(openai.APIError, match="fell over") as info:
        for chunk in sdk.chat.completions.create(model="broken", messages=messages, stream=True):
            parts.append(chunk.choices[0].delta.content)
    assert parts == ["one", " two"] and info.value.code == "backend_error"


def test_the_model_kwargs_phrase_never_reaches_an_hf_client() -> None:
    from gateway.protocol.hf import error_body as hf_error_body

    hazard = BackendFailure("The following `model_kwargs` are not used by the model: ['a']")
    assert "model_kwargs" not in hf_error_body(hazard)["error"]


def test_inconsistent_generate_parameters_are_a_validation_error(hf_server: LiveServer) -> None:
    r = requests.post(
        f"{hf_server.url}/models/bart-summarizer",
        json={"inputs": "hello", "parameters": {"generate_parameters": {"num_beams": 2, "num_beam_groups": 3}}},
    )
    _error(r, 422, "validation", "generate_parameters")


def test_question_is_cut_to_max_question_len(hf_server: LiveServer) -> None:
    context = "My name is Clara and I live in Berkeley"
    long_question = "who " * 200 + "?"
    body = {"inputs": {"question": long_question, "context": context}, "parameters": {"max_question_len": 4}}
    r = requests.post(f"{hf_server.url}/models/qa", json=body)
    assert r.status_code == 200 and context[r.json()["start"] : r.json()["end"]] == r.json()["answer"]
    r = requests.post(f"{hf_server.url}/models/qa", json={"inputs": body["inputs"]})
    _error(r, 422, "validation")  # without it, the question leaves no room for the context


WEIRD_BODIES = [
    b"{}",
    b"[]",
    b"null",
    b"42",
    b'{"inputs": null}',
    b'{"inputs": {}}',
    b'{"inputs": [[]]}',
    b'{"inputs": [1, 2]}',
    b'{"inputs": "x", "parameters": []}',
    b'{"inputs": "x", "parameters": {"top_k": -1}}',
    b"\xff\xfe\x00garbage",
    b'{"inputs": "x", "options": []}',
    b'{"inputs": "\xf0\x9f\x99\x82 [MASK]"}',
    b'{"inputs": {"question": 1, "context": 2}}',
]
MODELS = ["gpt2", "acme/sentiment", "nli", "ner", "mlm", "qa", "bart-summarizer", "vit", "all-minilm-l6-v2"]


@pytest.mark.parametrize("model", MODELS)
def test_no_input_makes_a_500(hf_server: LiveServer, model: str) -> None:
    for body in WEIRD_BODIES:
        r = requests.post(f"{hf_server.url}/models/{model}", data=body, timeout=60)
        assert r.status_code < 500, (model, body, r.text)
        if r.status_code >= 400:
            assert isinstance(r.json(), dict) and r.json()["error"], (model, body)


def test_api_keys_apply_to_hf_routes() -> None:
    models = [
        {"name": "chat", "task": "text-generation", "default": True, "backend": {"kind": "fake"}},
        {"name": "org/embed", "task": "feature-extraction", "backend": {"kind": "fake"}},
    ]
    with LiveServer(settings_for(models, api_keys=["sekret"])) as server:
        server.wait_ready()
        ok = InferenceClient(base_url=f"{server.url}/models/org/embed", api_key="sekret")
        assert ok.feature_extraction("hello").shape == (1, 8)
        assert InferenceClient(base_url=server.url, api_key="sekret").text_generation("a b", max_new_tokens=2) == "a b"
        r = requests.post(f"{server.url}/models/org/embed", json={"inputs": "hello"})
        _error(r, 401, "authentication")
        r = requests.post(server.url, json={"inputs": "hello"}, headers={"Authorization": "Bearer wrong"})
        _error(r, 401, "authentication")

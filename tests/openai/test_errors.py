"""Errors reach the openai SDK as the right exception class, in the OpenAI envelope."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import httpx
import openai
import pytest

from gateway.backends.base import Backend, ModelInfo
from gateway.backends.fake import FakeBackend
from gateway.backends.registry import default_backend_factory
from gateway.config import ModelSpec, Settings
from gateway.domain import FinishReason, GenerationRequest, Task, TokenDelta
from gateway.errors import BackendFailure, Overloaded
from tests.helpers import LiveServer, settings_for


def client_for(server: LiveServer, **kw: object) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key=kw.pop("api_key", "sk-test"), max_retries=0, **kw)  # type: ignore[arg-type]


def test_unknown_model_is_404_listing_served_models(fake_server: LiveServer) -> None:
    with pytest.raises(openai.NotFoundError) as info:
        client_for(fake_server).chat.completions.create(model="nope", messages=[{"role": "user", "content": "x"}])
    err = info.value
    assert err.status_code == 404 and err.code == "model_not_found" and err.param == "model"
    assert "fake-chat" in err.message and "fake-embed" in err.message
    assert err.request_id


@pytest.mark.parametrize(
    "kwargs, param",
    [
        ({"temperature": 5}, "temperature"),
        ({"n": 0}, "n"),
        ({"messages": []}, "messages"),
        ({"stop": ["a", "b", "c", "d", "e"]}, "stop"),
    ],
)
def test_invalid_values_are_400_naming_the_parameter(fake_server: LiveServer, kwargs: dict, param: str) -> None:
    args = {"model": "fake-chat", "messages": [{"role": "user", "content": "x"}], **kwargs}
    with pytest.raises(openai.BadRequestError) as info:
        client_for(fake_server).chat.completions.create(**args)
    assert info.value.param == param and info.value.type == "invalid_request_error"


def test_unsupported_parameters_are_400_and_no_effect_ones_reported(fake_server: LiveServer) -> None:
    client = client_for(fake_server)
    tools = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model="fake-chat", messages=[{"role": "user", "content": "x"}], tools=tools)
    assert info.value.param == "tools" and info.value.code == "unsupported_parameter"
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(
            model="fake-chat", messages=[{"role": "user", "content": "x"}], extra_body={"frobnicate": 1}
        )
    assert info.value.param == "frobnicate"
    raw = client.chat.completions.with_raw_response.create(
        model="fake-chat", messages=[{"role": "user", "content": "x"}], user="u1", logprobs=False
    )
    assert raw.headers["x-gateway-ignored-params"] == "user"


def test_stream_options_are_honoured_or_refused(fake_server: LiveServer) -> None:
    client = client_for(fake_server)
    msgs = [{"role": "user", "content": "a b"}]
    for options, param in [
        ({"include_usage": True, "continuous_usage_stats": True}, "stream_options.continuous_usage_stats"),
        ({"include_obfuscation": True}, "stream_options.include_obfuscation"),
        ({"include_usage": True, "frobnicate": 1}, "stream_options.frobnicate"),
    ]:
        with pytest.raises(openai.BadRequestError) as info:
            client.chat.completions.create(model="fake-chat", messages=msgs, stream=True, stream_options=options)  # type: ignore[arg-type]
        assert info.value.param == param and info.value.code == "unsupported_parameter"
        with pytest.raises(openai.BadRequestError) as info:
            client.completions.create(model="fake-chat", prompt="a b", stream=True, stream_options=options)  # type: ignore[arg-type]
        assert info.value.param == param
    # The neutral values ask for nothing; include_usage still works beside them.
    neutral = {"include_usage": True, "continuous_usage_stats": False, "include_obfuscation": False}
    chunks = list(client.chat.completions.create(model="fake-chat", messages=msgs, stream=True, stream_options=neutral))  # type: ignore[arg-type]
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 2
    # Without a stream, stream_options is a 400 (as OpenAI and vLLM answer), on both routes.
    for stream in (None, False):
        extra = {} if stream is None else {"stream": stream}
        with pytest.raises(openai.BadRequestError) as info:
            client.chat.completions.create(
                model="fake-chat",
                messages=msgs,
                stream_options={"include_usage": True},
                **extra,  # type: ignore[arg-type]
            )
        assert info.value.param == "stream_options" and "stream" in info.value.message
        with pytest.raises(openai.BadRequestError) as info:
            client.completions.create(
                model="fake-chat",
                prompt="a b",
                stream_options={"include_usage": True},
                **extra,  # type: ignore[arg-type]
            )
        assert info.value.param == "stream_options"
    # null asks for nothing
    plain = httpx.post(
        f"{fake_server.url}/v1/completions", json={"model": "fake-chat", "prompt": "a b", "stream_options": None}
    )
    assert plain.status_code == 200, plain.text


def test_completions_logprobs_zero_is_refused_not_dropped(fake_server: LiveServer) -> None:
    """`logprobs: 0` asks for each sampled token's log-probability (OpenAI's completions API): not
    the neutral `null`. The fake backend returns no log-probabilities, so 0..5 are all a 400."""
    client = client_for(fake_server)
    for value in (0, 1, 5):
        with pytest.raises(openai.BadRequestError) as info:
            client.completions.create(model="fake-chat", prompt="a b", logprobs=value)
        assert info.value.param == "logprobs" and info.value.code == "unsupported_parameter"
        with pytest.raises(openai.BadRequestError) as info:
            client.completions.create(model="fake-chat", prompt="a b", logprobs=value, stream=True)
        assert info.value.param == "logprobs"
    assert client.completions.create(model="fake-chat", prompt="a b", logprobs=None).choices[0].logprobs is None
    # On chat, `logprobs: false` and `top_logprobs: 0` ask for nothing; an int where a bool belongs does not.
    msgs = [{"role": "user", "content": "a b"}]
    client.chat.completions.create(model="fake-chat", messages=msgs, logprobs=False, top_logprobs=0)  # type: ignore[arg-type]
    for body in ({"logprobs": 0}, {"top_logprobs": False}, {"logprobs": True}):
        r = httpx.post(f"{fake_server.url}/v1/chat/completions", json={"model": "fake-chat", "messages": msgs, **body})
        assert r.status_code == 400 and r.json()["error"]["param"] == next(iter(body)), r.text


@pytest.mark.parametrize(
    "message, param",
    [
        ({"role": "assistant", "content": "x", "reasoning_content": "hmm"}, "messages[1].reasoning_content"),
        ({"role": "user", "content": [{"type": "text", "text": "x", "cache_control": {"type": "ephemeral"}}]},
         "messages[1].content[0].cache_control"),
    ],
    ids=["unknown-field", "unknown-part-field"],
)  # fmt: skip
def test_message_fields_that_would_be_dropped_are_400(fake_server: LiveServer, message: dict, param: str) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        client_for(fake_server).chat.completions.create(
            model="fake-chat",
            messages=[{"role": "user", "content": "x"}, message],  # type: ignore[list-item]
        )
    assert info.value.param == param and info.value.code == "unsupported_parameter"
    assert param in info.value.message


def test_neutral_message_fields_accepted_and_name_reported(fake_server: LiveServer) -> None:
    messages = [
        {"role": "system", "content": "s", "name": "rules"},
        {"role": "user", "content": "p q", "name": "bob"},
        # An earlier answer echoed back as the SDK models it: empty tool-call fields.
        {
            "role": "assistant",
            "content": "r",
            "tool_calls": [],
            "refusal": None,
            "function_call": None,
            "annotations": [],
        },
        {"role": "user", "content": [{"type": "text", "text": "s t"}]},
    ]
    raw = client_for(fake_server).chat.completions.with_raw_response.create(
        model="fake-chat",
        messages=messages,
        temperature=0,
        user="u1",  # type: ignore[arg-type]
    )
    assert raw.headers["x-gateway-ignored-params"] == "user,messages[].name"
    assert raw.parse().choices[0].message.content == "s t"  # the fake backend echoes the last message


@pytest.mark.parametrize(
    "path, body, param",
    [
        ("/v1/chat/completions", {"model": "fake-chat", "messages": "hi"}, "messages"),
        (
            "/v1/chat/completions",
            {"model": "fake-chat", "messages": [{"role": "user", "content": "x"}], "n": "two"},
            "n",
        ),
        ("/v1/completions", {"model": "fake-chat", "prompt": {"a": 1}}, "prompt"),
        ("/v1/embeddings", {"model": "fake-embed", "input": 5}, "input"),
        ("/v1/embeddings", {"model": "fake-embed", "input": "x", "encoding_format": "int8"}, "encoding_format"),
    ],
)
def test_openai_routes_answer_400_never_422(fake_server: LiveServer, path: str, body: dict, param: str) -> None:
    # FastAPI's default for a body that fails validation is 422; OpenAI (and this README) say 400.
    resp = httpx.post(f"{fake_server.url}{path}", json=body)
    assert resp.status_code == 400
    error = resp.json()["error"]
    assert error["type"] == "invalid_request_error" and error["param"].startswith(param)


def test_malformed_json_is_400_in_envelope(fake_server: LiveServer) -> None:
    resp = httpx.post(
        f"{fake_server.url}/v1/chat/completions", content=b"{not json", headers={"content-type": "application/json"}
    )
    assert resp.status_code == 400
    assert set(resp.json()["error"]) == {"message", "type", "param", "code"}


def test_embedding_model_cannot_chat(fake_server: LiveServer) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        client_for(fake_server).chat.completions.create(model="fake-embed", messages=[{"role": "user", "content": "x"}])
    assert info.value.code == "task_not_supported"


def test_api_keys_enforced_with_401() -> None:
    models = [{"name": "m", "task": "text-generation", "backend": {"kind": "fake"}}]
    with LiveServer(settings_for(models, api_keys=["secret-1", "secret-2"])) as server:
        with pytest.raises(openai.AuthenticationError):
            client_for(server, api_key="wrong").models.list()
        assert [m.id for m in client_for(server, api_key="secret-2").models.list()] == ["m"]
        assert httpx.get(f"{server.url}/health").status_code == 200  # probes stay open


def test_error_envelope_follows_the_route_not_the_url() -> None:
    """The route's API family picks the envelope, before routing (401) and after (404, 405)."""
    models = [{"name": "m", "task": "text-generation", "backend": {"kind": "fake"}}]
    with LiveServer(settings_for(models, api_keys=["k"])) as server:
        key = {"authorization": "Bearer k"}
        openai_shaped = [
            httpx.post(f"{server.url}/models/m/v1/chat/completions", json={}),  # 401, before routing
            httpx.post(f"{server.url}/models/nope/v1/chat/completions", json={}, headers=key),  # 404 for the model
            httpx.get(f"{server.url}/models/m/v1/chat/completions", headers=key),  # 405
            httpx.get(f"{server.url}/v1/no-such-path", headers=key),  # no route: /v1/ is the OpenAI API's
        ]
        assert [r.status_code for r in openai_shaped] == [401, 404, 405, 404]
        assert all(isinstance(r.json()["error"], dict) and r.json()["error"]["message"] for r in openai_shaped)
        # An HF route whose model id merely contains "/v1/" answers in the HF envelope.
        hf_shaped = [
            httpx.post(f"{server.url}/models/nope/v1/embeddings", json={"inputs": "x"}),  # 401
            httpx.post(f"{server.url}/models/nope/v1/embeddings", json={"inputs": "x"}, headers=key),  # 404
        ]
        assert [(r.status_code, r.json()["error_type"]) for r in hf_shaped] == [
            (401, "authentication"),
            (404, "not_found"),
        ]
        assert all(isinstance(r.json()["error"], str) for r in hf_shaped)


class _ScriptedBackend(FakeBackend):
    """Fails in the ways the tests ask for."""

    mode = "ok"
    closed = asyncio.Event

    async def generate_stream(self, request: GenerationRequest) -> AsyncIterator:  # type: ignore[override]
        if self.mode == "overloaded":
            raise Overloaded("busy", retry_after=3)
        if self.mode == "crash":
            raise BackendFailure("compute failed")
        yield TokenDelta(0, "partial", 1)
        if self.mode == "midstream":
            raise BackendFailure("lost the device")
        yield TokenDelta(0, " done", 2, finish_reason=FinishReason.STOP)


@pytest.fixture(scope="module")
def scripted() -> tuple[LiveServer, _ScriptedBackend]:
    made: list[_ScriptedBackend] = []

    def factory(spec: ModelSpec, settings: Settings) -> Backend:
        if spec.name == "scripted":
            made.append(_ScriptedBackend(spec))
            return made[-1]
        return default_backend_factory(spec, settings)

    models = [{"name": "scripted", "task": "text-generation", "backend": {"kind": "fake"}}]
    with LiveServer(settings_for(models), backend_factory=factory) as server:
        server.wait_ready()
        yield server, made[0]


def test_overloaded_is_429_with_retry_after(scripted: tuple[LiveServer, _ScriptedBackend]) -> None:
    server, backend = scripted
    backend.mode = "overloaded"
    with pytest.raises(openai.RateLimitError) as info:
        client_for(server).chat.completions.create(
            model="scripted", messages=[{"role": "user", "content": "x"}], stream=True
        )
    assert info.value.response.headers["retry-after"] == "3"


def test_backend_failure_is_500(scripted: tuple[LiveServer, _ScriptedBackend]) -> None:
    server, backend = scripted
    backend.mode = "crash"
    with pytest.raises(openai.InternalServerError) as info:
        client_for(server).chat.completions.create(model="scripted", messages=[{"role": "user", "content": "x"}])
    assert info.value.code == "backend_error"


def test_failure_after_first_chunk_is_in_band(scripted: tuple[LiveServer, _ScriptedBackend]) -> None:
    server, backend = scripted
    backend.mode = "midstream"
    stream = client_for(server).chat.completions.create(
        model="scripted", messages=[{"role": "user", "content": "x"}], stream=True
    )
    seen = []
    with pytest.raises(openai.APIError) as info:
        for chunk in stream:
            seen.append(chunk.choices[0].delta.content)
    assert seen == ["partial"]
    assert "lost the device" in info.value.message and info.value.code == "backend_error"
    backend.mode = "ok"


def test_lazy_model_loads_on_first_use() -> None:
    models = [{"name": "lazy", "task": "text-generation", "preload": False, "backend": {"kind": "fake"}}]
    with LiveServer(settings_for(models)) as server:
        assert httpx.get(f"{server.url}/v1/models/lazy").json()["state"] == "pending"
        resp = client_for(server).chat.completions.create(
            model="lazy", messages=[{"role": "user", "content": "hi"}], temperature=0
        )
        assert resp.choices[0].message.content == "hi"
        assert httpx.get(f"{server.url}/v1/models/lazy").json()["state"] == "ready"


class _NeverLoads(FakeBackend):
    async def _load(self) -> None:
        raise OSError("weights missing")

    def info(self) -> ModelInfo:
        return ModelInfo(task=Task.TEXT_GENERATION)


def test_failed_model_is_reported_and_503() -> None:
    def factory(spec: ModelSpec, settings: Settings) -> Backend:
        return _NeverLoads(spec)

    models = [{"name": "broken", "task": "text-generation", "backend": {"kind": "fake"}}]
    with LiveServer(settings_for(models), backend_factory=factory) as server:
        import time

        deadline = time.monotonic() + 5
        while httpx.get(f"{server.url}/v1/models/broken").json()["state"] != "failed":
            assert time.monotonic() < deadline
            time.sleep(0.05)
        card = httpx.get(f"{server.url}/v1/models/broken").json()
        assert "weights missing" in card["error"]
        assert httpx.get(f"{server.url}/ready").status_code == 503
        with pytest.raises(openai.InternalServerError) as info:
            client_for(server).chat.completions.create(model="broken", messages=[{"role": "user", "content": "x"}])
        assert info.value.status_code == 503


class _Buggy(FakeBackend):
    async def embed(self, request):  # type: ignore[no-untyped-def, override]
        raise ZeroDivisionError("a bug, not a GatewayError")


def test_unexpected_error_is_500_envelope_and_connection_survives() -> None:
    models = [{"name": "buggy", "task": "feature-extraction", "backend": {"kind": "fake"}}]
    with LiveServer(settings_for(models), backend_factory=lambda spec, settings: _Buggy(spec)) as server:
        with httpx.Client(base_url=server.url) as http:  # one keep-alive connection
            for _ in range(2):
                resp = http.post("/v1/embeddings", json={"model": "buggy", "input": "x"})
                assert resp.status_code == 500
                assert resp.json()["error"]["message"] == "Internal server error."  # no internals leaked
            assert http.get("/health").status_code == 200


@pytest.mark.parametrize(
    "message, param",
    [
        ({"role": "tool", "content": "42"}, "messages[1].tool_call_id"),
        (
            {"role": "user", "content": None,
             "tool_calls": [{"id": "call_1", "type": "function", "function": {"name": "f", "arguments": "{}"}}]},
            "messages[1].tool_calls",
        ),
        ({"role": "user", "content": "x", "tool_call_id": "call_1"}, "messages[1].tool_call_id"),
    ],
    ids=["tool-without-call-id", "user-tool-calls", "user-tool-call-id"],
)  # fmt: skip
def test_misplaced_tool_message_fields_are_400(fake_server: LiveServer, message: dict, param: str) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        client_for(fake_server).chat.completions.create(
            model="fake-chat",
            messages=[{"role": "user", "content": "x"}, message],  # type: ignore[list-item]
        )
    assert info.value.param == param

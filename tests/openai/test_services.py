"""The OpenAI family's services run without the web framework: an AppState and a RequestContext."""

from __future__ import annotations

import asyncio
import time

import pytest

from gateway.backends.registry import Registry
from gateway.context import RequestContext
from gateway.domain import EmbeddingRequest, GenerationRequest, SamplingParams, StreamEnd, TokenDelta
from gateway.errors import TaskNotSupported
from gateway.metrics import Metrics
from gateway.services import chat, completions, embeddings, models
from gateway.state import AppState
from tests.conftest import FAKE_MODELS
from tests.helpers import settings_for


def _state() -> AppState:
    settings = settings_for(FAKE_MODELS)
    return AppState(settings=settings, registry=Registry(settings), metrics=Metrics())


def _ctx() -> RequestContext:
    never = asyncio.Event()  # the client never disconnects
    return RequestContext(request_id="r1", received_at=time.perf_counter(), wait_disconnect=never.wait)


def _request(prompt: str, n: int = 1) -> GenerationRequest:
    return GenerationRequest(sampling=SamplingParams(max_tokens=2, n=n, seed=7), prompt=prompt, request_id="r1")


def test_completions_stream_numbers_choices_across_prompts_and_sums_usage() -> None:
    asyncio.run(_completions())


async def _completions() -> None:
    state, ctx = _state(), _ctx()
    events = [
        e async for e in await completions.stream(state, ctx, "fake/chat", [_request("a b", 2), _request("c", 2)])
    ]
    deltas = [e for e in events if isinstance(e, TokenDelta)]
    assert sorted({d.index for d in deltas}) == [0, 1, 2, 3]
    assert isinstance(events[-1], StreamEnd) and sum(isinstance(e, StreamEnd) for e in events) == 1
    assert events[-1].usage.prompt_tokens == 2 + 1 and events[-1].usage.completion_tokens == 2 * 2 * 2
    assert ctx.model == "fake-chat"  # the alias resolved to the metrics label
    results = await completions.complete(state, ctx, "fake-chat", [_request("a b", 2), _request("c", 2)])
    assert [len(r.choices) for r in results] == [2, 2]


def test_chat_and_embeddings_resolve_check_the_task_and_meter() -> None:
    asyncio.run(_chat_and_embeddings())


async def _chat_and_embeddings() -> None:
    state, ctx = _state(), _ctx()
    result = await chat.complete(state, ctx, "fake-chat", _request("x y"))
    assert result.usage.completion_tokens == 2
    with pytest.raises(TaskNotSupported):
        await chat.stream(state, _ctx(), "fake-embed", _request("x"))
    embedded = await embeddings.embed(state, ctx, "fake-embed", EmbeddingRequest(inputs=("hello",)))
    assert len(embedded.vectors) == 1 and len(embedded.vectors[0]) == 8
    rendered = state.metrics.render()[0].decode()
    assert 'gateway_prompt_tokens_total{model="fake-embed"}' in rendered
    assert [m["name"] for m in models.all_models(state)] == ["fake-chat", "fake-embed"]
    assert models.one_model(state, "fake/chat")["name"] == "fake-chat"

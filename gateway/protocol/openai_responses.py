"""OpenAI response and stream-chunk bodies, built as plain dicts (cheap to serialise)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterable, Mapping
from typing import Any

from gateway.domain import (
    Choice,
    EmbeddingResult,
    GenerationEvent,
    GenerationResult,
    StreamEnd,
    TokenDelta,
    ToolCallDelta,
    Usage,
)
from gateway.errors import GatewayError
from gateway.protocol.openai import encode_embedding


def usage_body(usage: Usage) -> dict[str, Any]:
    # OpenAI always sends prompt_tokens_details; clients read cached_tokens from it.
    return {
        "prompt_tokens": usage.prompt_tokens,
        "completion_tokens": usage.completion_tokens,
        "total_tokens": usage.total_tokens,
        "prompt_tokens_details": {"cached_tokens": usage.cached_tokens},
    }


def _reason(delta: TokenDelta) -> str | None:
    return delta.finish_reason.openai if delta.finish_reason is not None else None


def chat_message(choice: Choice) -> dict[str, Any]:
    """An answer's message: its text, or (content null) its tool calls."""
    if not choice.tool_calls:
        return {"role": "assistant", "content": choice.text}
    calls = [
        {"id": c.id, "type": "function", "function": {"name": c.name, "arguments": c.arguments}}
        for c in choice.tool_calls
    ]
    return {"role": "assistant", "content": choice.text or None, "tool_calls": calls}


def chat_completion(result: GenerationResult, *, id: str, model: str, created: int) -> dict[str, Any]:
    return {
        "id": id,
        "object": "chat.completion",
        "created": created,
        "model": model,
        "system_fingerprint": None,
        "choices": [
            {
                "index": c.index,
                "message": chat_message(c),
                "finish_reason": c.finish_reason.openai if c.finish_reason else None,
                "logprobs": None,
            }
            for c in result.choices
        ],
        "usage": usage_body(result.usage),
    }


def chat_chunk(
    *, id: str, model: str, created: int, choices: list[dict[str, Any]], usage: Usage | None = None
) -> dict[str, Any]:
    chunk: dict[str, Any] = {
        "id": id,
        "object": "chat.completion.chunk",
        "created": created,
        "model": model,
        "system_fingerprint": None,
        "choices": choices,
    }
    if usage is not None:
        chunk["usage"] = usage_body(usage)
    return chunk


def chat_delta_choice(delta: TokenDelta, *, first: bool) -> dict[str, Any]:
    body: dict[str, Any] = {"content": delta.text}
    if first:
        body["role"] = "assistant"
    return {"index": delta.index, "delta": body, "finish_reason": _reason(delta), "logprobs": None}


def tool_call_choice(delta: ToolCallDelta, *, first: bool) -> dict[str, Any]:
    """A piece of a streamed tool call: index, id, type and name first, then argument fragments."""
    call: dict[str, Any] = {"index": delta.call}
    if delta.id is not None:
        call["id"], call["type"] = delta.id, "function"
        call["function"] = {"name": delta.name, "arguments": delta.arguments}
    else:
        call["function"] = {"arguments": delta.arguments}
    body: dict[str, Any] = {"tool_calls": [call]}
    if first:
        body["role"], body["content"] = "assistant", None
    return {"index": delta.index, "delta": body, "finish_reason": None, "logprobs": None}


async def chat_chunks(
    events: AsyncIterator[GenerationEvent], *, id: str, model: str, created: int, include_usage: bool
) -> AsyncIterator[dict[str, Any]]:
    """A chat stream's chunks: the role on each choice's first chunk, usage last when asked for."""
    started: set[int] = set()
    async for event in events:
        if isinstance(event, StreamEnd):
            if include_usage:
                yield chat_chunk(id=id, model=model, created=created, choices=[], usage=event.usage)
            continue
        if isinstance(event, ToolCallDelta):
            choice = tool_call_choice(event, first=event.index not in started)
            started.add(event.index)
            yield chat_chunk(id=id, model=model, created=created, choices=[choice])
            continue
        if not event.text and event.finish_reason is None and event.index in started:
            continue  # nothing to say yet (held-back or partial character)
        choice = chat_delta_choice(event, first=event.index not in started)
        started.add(event.index)
        yield chat_chunk(id=id, model=model, created=created, choices=[choice])


def completion(results: list[GenerationResult], *, id: str, model: str, created: int) -> dict[str, Any]:
    """One text_completion for several prompts: choices are numbered prompt by prompt."""
    choices: list[dict[str, Any]] = []
    usage = Usage()
    for result in results:
        for c in result.choices:
            choices.append(
                {
                    "index": len(choices),
                    "text": c.text,
                    "finish_reason": c.finish_reason.openai if c.finish_reason else None,
                    "logprobs": None,
                }
            )
        usage.add(result.usage)
    return {
        "id": id,
        "object": "text_completion",
        "created": created,
        "model": model,
        "system_fingerprint": None,
        "choices": choices,
        "usage": usage_body(usage),
    }


def completion_chunk(
    *, id: str, model: str, created: int, delta: TokenDelta | None, usage: Usage | None = None
) -> dict[str, Any]:
    chunk: dict[str, Any] = {
        "id": id,
        "object": "text_completion",
        "created": created,
        "model": model,
        "system_fingerprint": None,
        "choices": []
        if delta is None
        else [{"index": delta.index, "text": delta.text, "finish_reason": _reason(delta), "logprobs": None}],
    }
    if usage is not None:
        chunk["usage"] = usage_body(usage)
    return chunk


async def completion_chunks(
    events: AsyncIterator[GenerationEvent], *, id: str, model: str, created: int, include_usage: bool
) -> AsyncIterator[dict[str, Any]]:
    """A completion stream's chunks (deltas with something to say), usage last when asked for."""
    async for event in events:
        if isinstance(event, StreamEnd):
            if include_usage:
                yield completion_chunk(id=id, model=model, created=created, delta=None, usage=event.usage)
        elif isinstance(event, TokenDelta) and (event.text or event.finish_reason is not None):
            yield completion_chunk(id=id, model=model, created=created, delta=event)


def embeddings(result: EmbeddingResult, *, model: str, encoding_format: str) -> dict[str, Any]:
    data = [
        {"object": "embedding", "index": i, "embedding": encode_embedding(vector, encoding_format)}
        for i, vector in enumerate(result.vectors)
    ]
    usage = {"prompt_tokens": result.usage.prompt_tokens, "total_tokens": result.usage.prompt_tokens}
    return {"object": "list", "model": model, "data": data, "usage": usage}


def model_card(model: Mapping[str, Any], *, created: int) -> dict[str, Any]:
    """One entry of /v1/models from a model summary (services/models.py)."""
    card: dict[str, Any] = {
        "id": model["name"],
        "object": "model",
        "created": created,
        "owned_by": "gateway",
        "aliases": model["aliases"],
        "task": model["task"],
        "backend": model["backend"],
        "state": model["state"],
    }
    if model["deployments"] is not None:
        card["deployments"] = [{"name": name, "backend": kind} for name, kind in model["deployments"]]
    if model["max_total_tokens"]:
        card["max_model_len"] = model["max_total_tokens"]
    if model["error"]:
        card["error"] = model["error"]
    return card


def model_list(models: Iterable[Mapping[str, Any]], *, created: int) -> dict[str, Any]:
    return {"object": "list", "data": [model_card(m, created=created) for m in models]}


def error_body(exc: GatewayError) -> dict[str, Any]:
    return {"error": {"message": exc.message, "type": exc.openai_type, "param": exc.param, "code": exc.code}}


def stream_error_body(exc: GatewayError) -> dict[str, Any]:
    """An in-band stream error both clients read: OpenAI's SDK takes `error`, huggingface_hub
    picks its exception class (GenerationError, OverloadedError...) by `error_type`."""
    return {**error_body(exc), "error_type": exc.hf_error_type}

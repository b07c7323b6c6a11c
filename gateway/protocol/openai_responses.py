"""OpenAI response and stream-chunk bodies, built as plain dicts (cheap to serialise)."""

from __future__ import annotations

import codecs
from collections.abc import AsyncIterator, Iterable, Mapping
from typing import Any

from gateway.domain import (
    Choice,
    EmbeddingResult,
    GenerationEvent,
    GenerationResult,
    StreamEnd,
    TokenDelta,
    TokenText,
    ToolCallDelta,
    TopToken,
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


# --- logprobs ----------------------------------------------------------------------------------


def scored(delta: TokenDelta) -> bool:
    """Whether a delta is a token that has a logprobs entry: any token described as itself,
    except the end-of-sequence token that ends a choice (its text is never part of the answer)."""
    return delta.own is not None and (delta.echoed or not delta.special)


def _bytes(raw: bytes | None) -> list[int] | None:
    return list(raw) if raw is not None else None


def _top_entry(top: TopToken) -> dict[str, Any]:
    return {"token": top.text, "logprob": top.logprob, "bytes": _bytes(top.raw)}


def chat_logprob(delta: TokenDelta) -> dict[str, Any]:
    """One entry of a chat choice's `logprobs.content` (ChatCompletionTokenLogprob)."""
    assert delta.own is not None
    return {
        "token": delta.own.text,
        "logprob": delta.logprob,
        "bytes": _bytes(delta.own.raw),
        "top_logprobs": [_top_entry(t) for t in delta.top],
    }


def chat_logprobs(tokens: Iterable[TokenDelta]) -> dict[str, Any]:
    return {"content": [chat_logprob(t) for t in tokens if scored(t)], "refusal": None}


class TextOffsets:
    """Where each token of a choice starts in its text, in characters: from the tokens' bytes
    (a character split across tokens starts in the first), or their text where no bytes are known."""

    def __init__(self) -> None:
        self.offset = 0
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def start(self, token: TokenText) -> int:
        start = self.offset
        self.offset += len(self._decoder.decode(token.raw) if token.raw is not None else token.text)
        return start


def completion_logprobs(tokens: Iterable[TokenDelta], offsets: TextOffsets | None = None) -> dict[str, Any]:
    """A completion choice's `logprobs`: the tokens, their logprobs, the most likely tokens at each
    step (with the chosen one, as vLLM and OpenAI list it; None where the logprob is: an echoed
    prompt's first token) and each token's offset in the text (`offsets` go on across chunks)."""
    offsets = offsets or TextOffsets()
    body: dict[str, Any] = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    for t in tokens:
        if not scored(t):
            continue
        assert t.own is not None
        top: dict[str, float] | None = None
        if t.logprob is not None:
            top = {alternative.text: alternative.logprob for alternative in t.top}
            top.setdefault(t.own.text, t.logprob)
        body["tokens"].append(t.own.text)
        body["token_logprobs"].append(t.logprob)
        body["top_logprobs"].append(top)
        body["text_offset"].append(offsets.start(t.own))
    return body


# --- chat ----------------------------------------------------------------------------------------


def chat_message(choice: Choice) -> dict[str, Any]:
    """An answer's message: its text, or (content null) its tool calls."""
    if not choice.tool_calls:
        return {"role": "assistant", "content": choice.text}
    calls = [
        {"id": c.id, "type": "function", "function": {"name": c.name, "arguments": c.arguments}}
        for c in choice.tool_calls
    ]
    return {"role": "assistant", "content": choice.text or None, "tool_calls": calls}


def chat_completion(
    result: GenerationResult, *, id: str, model: str, created: int, logprobs: bool = False
) -> dict[str, Any]:
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
                "logprobs": chat_logprobs(c.tokens) if logprobs else None,
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


def chat_delta_choice(
    delta: TokenDelta, *, first: bool, logprobs: list[dict[str, Any]] | None = None
) -> dict[str, Any]:
    body: dict[str, Any] = {"content": delta.text}
    if first:
        body["role"] = "assistant"
    scores = {"content": logprobs, "refusal": None} if logprobs else None
    return {"index": delta.index, "delta": body, "finish_reason": _reason(delta), "logprobs": scores}


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
    events: AsyncIterator[GenerationEvent],
    *,
    id: str,
    model: str,
    created: int,
    include_usage: bool,
    logprobs: bool = False,
) -> AsyncIterator[dict[str, Any]]:
    """A chat stream's chunks: the role on each choice's first chunk, usage last when asked for.
    With logprobs, each chunk carries the entries of its tokens (a token with no text of its own
    yet, such as part of a character, is carried by the next chunk of its choice)."""
    started: set[int] = set()
    pending: dict[int, list[dict[str, Any]]] = {}
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
        if logprobs and scored(event):
            pending.setdefault(event.index, []).append(chat_logprob(event))
        if not event.text and event.finish_reason is None and event.index in started:
            continue  # nothing to say yet (held-back or partial character)
        choice = chat_delta_choice(event, first=event.index not in started, logprobs=pending.pop(event.index, None))
        started.add(event.index)
        yield chat_chunk(id=id, model=model, created=created, choices=[choice])


# --- completions -----------------------------------------------------------------------------------


def completion(
    results: list[GenerationResult], *, id: str, model: str, created: int, logprobs: bool = False
) -> dict[str, Any]:
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
                    "logprobs": completion_logprobs(c.tokens) if logprobs else None,
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
    *,
    id: str,
    model: str,
    created: int,
    delta: TokenDelta | None,
    usage: Usage | None = None,
    logprobs: dict[str, Any] | None = None,
) -> dict[str, Any]:
    chunk: dict[str, Any] = {
        "id": id,
        "object": "text_completion",
        "created": created,
        "model": model,
        "system_fingerprint": None,
        "choices": []
        if delta is None
        else [{"index": delta.index, "text": delta.text, "finish_reason": _reason(delta), "logprobs": logprobs}],
    }
    if usage is not None:
        chunk["usage"] = usage_body(usage)
    return chunk


async def completion_chunks(
    events: AsyncIterator[GenerationEvent],
    *,
    id: str,
    model: str,
    created: int,
    include_usage: bool,
    logprobs: bool = False,
) -> AsyncIterator[dict[str, Any]]:
    """A completion stream's chunks (deltas with something to say), usage last when asked for.
    With logprobs, each chunk carries its tokens' (as chat_chunks does), offsets running on
    across the choice's chunks."""
    pending: dict[int, list[TokenDelta]] = {}
    offsets: dict[int, TextOffsets] = {}
    async for event in events:
        if isinstance(event, StreamEnd):
            if include_usage:
                yield completion_chunk(id=id, model=model, created=created, delta=None, usage=event.usage)
            continue
        if not isinstance(event, TokenDelta):
            continue  # completions have no tool calls
        if logprobs and scored(event):
            pending.setdefault(event.index, []).append(event)
        if not event.text and event.finish_reason is None:
            continue
        scores = None
        if logprobs:
            scores = completion_logprobs(pending.pop(event.index, []), offsets.setdefault(event.index, TextOffsets()))
        yield completion_chunk(id=id, model=model, created=created, delta=event, logprobs=scores)


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

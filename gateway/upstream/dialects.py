"""Domain requests to each upstream API's wire format, and its answers back to domain types.

Only allowlisted, typed fields are ever sent upstream: nothing from the client's
raw body is forwarded, so a request cannot smuggle parameters (or a URL) through.
Every parser raises UpstreamError on a body it cannot read, never KeyError.
"""

from __future__ import annotations

import base64
import json
from dataclasses import replace
from typing import Any

from gateway.detokenize import StopFilter
from gateway.domain import (
    ChatMessage,
    Choice,
    EmbeddingRequest,
    EmbeddingResult,
    FinishReason,
    GenerationEvent,
    GenerationRequest,
    GenerationResult,
    Grammar,
    StreamEnd,
    Task,
    TokenDelta,
    TokenText,
    Tool,
    ToolCall,
    ToolCallDelta,
    TopToken,
    Usage,
)
from gateway.errors import UnsupportedParameter, UpstreamError


def finish_reason(value: Any) -> FinishReason | None:
    if value is None:
        return None
    if value == "tool_calls":
        return FinishReason.TOOL_CALLS
    return FinishReason.LENGTH if value == "length" else FinishReason.STOP


def kept_stops(request: GenerationRequest) -> tuple[str, ...]:
    """The stop sequences a request wants left at the end of its text (TGI routes)."""
    return request.sampling.stop if request.keep_stop else ()


def dropped_stops(request: GenerationRequest) -> tuple[str, ...]:
    """The stop sequences to cut from a TGI upstream's text, which keeps them (OpenAI routes)."""
    return () if request.keep_stop else request.sampling.stop


def restored_stop(choice: dict[str, Any], keep: tuple[str, ...]) -> str:
    """The stop sequence to put back at the end of a choice whose request keeps it (TGI routes).

    OpenAI-style servers drop it, and "stop" does not tell a stop sequence from end-of-sequence;
    only a server that names the match (vLLM's `stop_reason`) says what to put back.
    """
    matched = choice.get("stop_reason")
    return matched if isinstance(matched, str) and matched in keep else ""


def malformed(what: str) -> UpstreamError:
    return UpstreamError(f"The upstream sent a malformed {what}.")


def stream_error(data: dict[str, Any]) -> UpstreamError:
    error = data.get("error")
    message = error.get("message") if isinstance(error, dict) else error
    return UpstreamError(f"The upstream failed mid-stream: {str(message or 'unknown error')[:300]}")


# --- OpenAI-compatible (vLLM, TGI Messages API, llama.cpp server, hosted APIs) -------------------


def openai_generation(request: GenerationRequest, model: str, stream: bool) -> tuple[str, dict[str, Any]]:
    s = request.sampling
    body: dict[str, Any] = {"model": model}
    if request.messages is not None:
        path = "/chat/completions"
        body["messages"] = [_openai_message(m) for m in request.messages]
        body.update(_openai_tools(request))
    else:
        path = "/completions"
        body["prompt"] = request.prompt
    response_format = _openai_response_format(request)
    if response_format is not None:
        body["response_format"] = response_format
    if s.max_tokens is not None:
        body["max_tokens"] = s.max_tokens
    body["temperature"] = s.temperature
    body["top_p"] = s.top_p
    if s.n != 1:
        body["n"] = s.n
    if s.stop:
        body["stop"] = list(s.stop)
    if s.seed is not None:
        body["seed"] = s.seed
    if s.presence_penalty:
        body["presence_penalty"] = s.presence_penalty
    if s.frequency_penalty:
        body["frequency_penalty"] = s.frequency_penalty
    # vLLM / TGI extensions, sent only when asked for so strict servers are not upset.
    if s.top_k:
        body["top_k"] = s.top_k
    if s.repetition_penalty != 1.0:
        body["repetition_penalty"] = s.repetition_penalty
    # TGI-route options these APIs have no standard field for: refused, not dropped.
    if request.truncate:
        raise UnsupportedParameter("truncate", "is not supported by this deployment (an OpenAI-compatible API)")
    if s.top_n and not s.logprobs:
        raise UnsupportedParameter("top_n_tokens", "is not supported by this deployment (an OpenAI-compatible API)")
    _openai_logprobs(body, request)
    if stream:
        body["stream"] = True
        body["stream_options"] = {"include_usage": True}
    return path, body


def _openai_logprobs(body: dict[str, Any], request: GenerationRequest) -> None:
    """OpenAI's logprobs fields, in the shape of the endpoint the request goes to."""
    s = request.sampling
    if request.messages is not None:
        if s.logprobs:
            body["logprobs"] = True
            if s.top_n:
                body["top_logprobs"] = s.top_n
    else:
        if s.logprobs:
            body["logprobs"] = s.top_n
        if request.echo:
            body["echo"] = True


def _raw(value: Any) -> bytes | None:
    return bytes(value) if isinstance(value, list) else None


def _token_bytes(token: str) -> bytes:
    """A completions token's bytes, which that API does not list: its text, or the bytes its
    `bytes:\\xNN` form names (a token that is only part of a character)."""
    if token.startswith("bytes:\\x"):
        try:
            return bytes(int(h, 16) for h in token[len("bytes:\\x") :].split("\\x"))
        except ValueError:
            pass
    return token.encode()


def openai_tokens(logprobs: Any, index: int = 0) -> list[TokenDelta]:
    """A choice's `logprobs` (chat's `content` entries, or completions' parallel lists) as one
    text-less delta per token, each described as itself (TokenDelta.own) with its top tokens."""
    if not isinstance(logprobs, dict):
        return []
    if "content" in logprobs or "tokens" not in logprobs:
        return [
            TokenDelta(
                index,
                "",
                logprob=float(e["logprob"]),
                top=tuple(
                    TopToken(-1, str(t["token"]), float(t["logprob"]), raw=_raw(t.get("bytes")))
                    for t in e.get("top_logprobs") or ()
                ),
                own=TokenText(str(e["token"]), _raw(e.get("bytes"))),
            )
            for e in logprobs.get("content") or ()
        ]
    values = logprobs.get("token_logprobs") or []
    tops = logprobs.get("top_logprobs") or [None] * len(values)
    return [
        TokenDelta(
            index,
            "",
            logprob=None if value is None else float(value),
            top=tuple(TopToken(-1, str(k), float(v)) for k, v in (top or {}).items()),
            own=TokenText(str(token), _token_bytes(str(token))),
            echoed=value is None,
        )
        for token, value, top in zip(logprobs["tokens"], values, tops, strict=True)
    ]


def _openai_message(m: ChatMessage) -> dict[str, Any]:
    message: dict[str, Any] = {"role": m.role, "content": m.content}
    if m.tool_calls:
        message["tool_calls"] = [
            {"id": c.id, "type": "function", "function": {"name": c.name, "arguments": c.arguments}}
            for c in m.tool_calls
        ]
    if m.tool_call_id is not None:
        message["tool_call_id"] = m.tool_call_id
    return message


def _openai_tools(request: GenerationRequest) -> dict[str, Any]:
    """tools, tool_choice and parallel_tool_calls as the client sent them."""
    body: dict[str, Any] = {}
    if request.tools:
        body["tools"] = [{"type": "function", "function": _function(t)} for t in request.tools]
    choice = request.tool_choice
    if choice is not None:
        named = {"type": "function", "function": {"name": choice.name}}
        body["tool_choice"] = named if choice.name else choice.mode
    if request.parallel_tool_calls is not None:
        body["parallel_tool_calls"] = request.parallel_tool_calls
    return body


def _function(tool: Tool) -> dict[str, Any]:
    function: dict[str, Any] = {"name": tool.name}
    if tool.description:
        function["description"] = tool.description
    function["parameters"] = json.loads(tool.parameters)
    if tool.strict is not None:
        function["strict"] = tool.strict
    return function


def _openai_response_format(request: GenerationRequest) -> dict[str, Any] | None:
    """The client's response_format unchanged; a TGI-route grammar as its OpenAI equivalent."""
    if request.response_format is not None:
        return request.response_format
    grammar = request.sampling.grammar
    if grammar is None:
        return None
    if grammar.kind == "json_schema":
        return {"type": "json_schema", "json_schema": {"name": "response", "schema": json.loads(grammar.value)}}
    if grammar.kind == "json_object":
        return {"type": "json_object"}
    raise UnsupportedParameter(
        grammar.param, f"({grammar.kind}) is not supported by this deployment (an OpenAI-compatible API)"
    )


def _tool_calls(message: Any) -> list[ToolCall]:
    calls = message.get("tool_calls") if isinstance(message, dict) else None
    return [
        ToolCall(str(c["id"]), str(c["function"]["name"]), str(c["function"].get("arguments") or ""))
        for c in calls or ()
    ]


def _tool_call_deltas(index: int, delta: Any) -> list[ToolCallDelta]:
    calls = delta.get("tool_calls") if isinstance(delta, dict) else None
    out = []
    for c in calls or ():
        function = c.get("function") or {}
        out.append(
            ToolCallDelta(
                index, int(c.get("index", 0)), c.get("id"), function.get("name"), function.get("arguments") or ""
            )
        )
    return out


def _usage(data: dict[str, Any]) -> Usage:
    usage = data.get("usage")
    if not isinstance(usage, dict):
        return Usage()
    details = usage.get("prompt_tokens_details")
    cached = details.get("cached_tokens") if isinstance(details, dict) else None
    return Usage(int(usage.get("prompt_tokens") or 0), int(usage.get("completion_tokens") or 0), int(cached or 0))


def openai_result(data: Any, n: int, keep_stop: tuple[str, ...] = ()) -> GenerationResult:
    try:
        choices: list[Choice] = []
        for c in data["choices"]:
            message = c.get("message")
            text = message.get("content") if isinstance(message, dict) else c["text"]
            if text is not None and not isinstance(text, str):
                raise TypeError("text")
            text = (text or "") + restored_stop(c, keep_stop)
            index, reason = int(c.get("index", len(choices))), finish_reason(c.get("finish_reason"))
            tokens = openai_tokens(c.get("logprobs"), index)
            choices.append(Choice(index, text, reason, tokens, tool_calls=_tool_calls(message)))
        usage = _usage(data)
    except (KeyError, TypeError, ValueError, AttributeError):
        raise malformed("completion") from None
    if not choices:
        raise malformed("completion (no choices)")
    choices.sort(key=lambda c: c.index)
    return GenerationResult(choices=choices, usage=usage)


class OpenAIStream:
    """Turns each `data:` payload of an OpenAI stream into domain events as it arrives.

    The stream is complete at `[DONE]`, or, for servers that just close the connection,
    once every choice has its finish_reason.
    """

    def __init__(self, n: int = 1, keep_stop: tuple[str, ...] = ()) -> None:
        self.usage = Usage()
        self.done = False
        self.n = n
        self.keep_stop = keep_stop
        self.finished: set[int] = set()

    @property
    def complete(self) -> bool:
        return self.done or len(self.finished) >= self.n

    def feed(self, data: dict[str, Any]) -> list[GenerationEvent]:
        if "error" in data and data["error"]:
            raise stream_error(data)
        try:
            if isinstance(data.get("usage"), dict):
                self.usage = _usage(data)
            events: list[GenerationEvent] = []
            for c in data.get("choices") or ():
                delta = c.get("delta")
                text = delta.get("content") if isinstance(delta, dict) else c.get("text")
                reason = finish_reason(c.get("finish_reason"))
                if reason is not None:
                    text = (text or "") + restored_stop(c, self.keep_stop)
                index = int(c.get("index", 0))
                if reason is not None:
                    self.finished.add(index)
                events += _tool_call_deltas(index, delta)
                # the chunk's tokens, the last one carrying its text and finish (or the text alone)
                tokens = openai_tokens(c.get("logprobs"), index) or [TokenDelta(index, "")]
                if text or reason is not None or tokens[-1].own is not None:
                    tokens[-1] = replace(tokens[-1], text=text or "", finish_reason=reason)
                    events += tokens
            return events
        except (KeyError, TypeError, ValueError, AttributeError):
            raise malformed("stream chunk") from None

    def end(self) -> StreamEnd:
        return StreamEnd(self.usage)


def openai_embedding(request: EmbeddingRequest, model: str) -> tuple[str, dict[str, Any]]:
    body: dict[str, Any] = {"model": model, "input": list(request.inputs), "encoding_format": "float"}
    if request.dimensions is not None:
        body["dimensions"] = request.dimensions
    return "/embeddings", body


def openai_embedding_result(data: Any, count: int) -> EmbeddingResult:
    try:
        rows = sorted(data["data"], key=lambda row: row["index"])
        vectors = [[float(v) for v in row["embedding"]] for row in rows]
        usage = data.get("usage") or {}
        prompt_tokens = int(usage.get("prompt_tokens") or 0)
    except (KeyError, TypeError, ValueError, AttributeError):
        raise malformed("embedding response") from None
    if len(vectors) != count:
        raise malformed(f"embedding response ({len(vectors)} vectors for {count} inputs)")
    return EmbeddingResult(vectors=vectors, usage=Usage(prompt_tokens=prompt_tokens))


# --- TGI native API and HF text-generation endpoints ---------------------------------------------


def _tgi_refusals(request: GenerationRequest) -> None:
    """What TGI's native API has no field for: refused by name."""
    s = request.sampling
    if request.tools:  # (only TGI's Messages API takes tools: use the openai dialect for it)
        raise UnsupportedParameter("tools", "is not supported by this deployment (TGI's native API)")
    if request.messages is not None:
        raise UnsupportedParameter(
            "messages", "is not served by this deployment: it speaks TGI's native API, which takes a prompt"
        )
    if not isinstance(request.prompt, str):
        raise UnsupportedParameter("prompt", "must be text for this deployment (token ids are not accepted)")
    if s.n != 1:
        raise UnsupportedParameter("n", "must be 1 for this deployment")
    if s.presence_penalty:  # TGI's API has frequency and repetition penalties, no presence penalty
        raise UnsupportedParameter("presence_penalty", "is not supported by this deployment (TGI's API has none)")


def tgi_parameters(request: GenerationRequest) -> dict[str, Any]:
    _tgi_refusals(request)
    s = request.sampling
    params: dict[str, Any] = {"details": True, "return_full_text": False, "do_sample": not s.greedy}
    if s.max_tokens is not None:
        params["max_new_tokens"] = s.max_tokens
    # TGI refuses temperature 0 and top_p 1: leave out what only restates the default.
    if not s.greedy:
        params["temperature"] = s.temperature
        if s.top_p < 1.0:
            params["top_p"] = s.top_p
        if s.top_k:
            params["top_k"] = s.top_k
    if s.seed is not None:
        params["seed"] = s.seed
    if s.stop:
        params["stop"] = list(s.stop)
    if s.repetition_penalty != 1.0:
        params["repetition_penalty"] = s.repetition_penalty
    if s.frequency_penalty:
        params["frequency_penalty"] = s.frequency_penalty
    if request.truncate:
        params["truncate"] = request.truncate
    if s.top_n:
        params["top_n_tokens"] = s.top_n
    if s.grammar is not None:
        params["grammar"] = _tgi_grammar(s.grammar)
    return params


def _tgi_grammar(grammar: Grammar) -> dict[str, Any]:
    """TGI's `grammar` parameter: json (a schema) and regex; nothing else."""
    if grammar.kind == "json_schema":
        return {"type": "json", "value": json.loads(grammar.value)}
    if grammar.kind == "json_object":
        return {"type": "json", "value": {"type": "object"}}
    if grammar.kind == "regex":
        return {"type": "regex", "value": grammar.value}
    raise UnsupportedParameter(grammar.param, f"({grammar.kind}) is not supported by this deployment (TGI's API)")


def _tgi_token(token: dict[str, Any], top: Any = None) -> TokenDelta:
    special = bool(token.get("special"))
    alternatives = tuple(
        TopToken(int(t["id"]), str(t.get("text") or ""), float(t["logprob"]), bool(t.get("special"))) for t in top or ()
    )
    text = str(token.get("text") or "")
    # TGI says each token's text, not its bytes
    own = TokenText(text, None)
    return TokenDelta(
        0, "" if special else text, token.get("id"), token.get("logprob"), special, top=alternatives, own=own
    )


def tgi_result(data: Any, drop_stop: tuple[str, ...] = (), prompt_tokens: str | None = None) -> GenerationResult:
    """A TGI /generate answer (details asked for). `prompt_tokens` is TGI's `x-prompt-tokens` header:
    its non-streamed details have no input length (only `prefill`, when decoder_input_details)."""
    if isinstance(data, list) and data:
        data = data[0]  # HF endpoints answer a one-element list
    try:
        text = data["generated_text"]
        details = data.get("details") or {}
        reason = finish_reason(details.get("finish_reason") or "stop")
        raw_tokens = details.get("tokens") or ()
        tops = details.get("top_tokens") or [None] * len(raw_tokens)
        tokens = [_tgi_token(t, top) for t, top in zip(raw_tokens, tops, strict=False)]
        prompt = int(prompt_tokens) if prompt_tokens and prompt_tokens.isdigit() else len(details.get("prefill") or ())
        usage = Usage(prompt, int(details.get("generated_tokens") or len(tokens)))
    except (KeyError, TypeError, ValueError, AttributeError):
        raise malformed("generation") from None
    if not isinstance(text, str):
        raise malformed("generation")
    if drop_stop:
        cut = StopFilter(drop_stop)
        text = cut.feed(text) + cut.flush()
    return GenerationResult(choices=[Choice(0, text, reason, tokens)], usage=usage)


class TGIStream:
    """TGI `/generate_stream` events (one token each; the last carries `details`) to domain events.

    TGI keeps a matched stop sequence in its text; `drop_stop` cuts it for the routes that drop it.
    """

    def __init__(self, drop_stop: tuple[str, ...] = ()) -> None:
        self.usage = Usage()
        self.done = False
        self.stop_filter = StopFilter(drop_stop) if drop_stop else None

    @property
    def complete(self) -> bool:
        return self.done

    def feed(self, data: dict[str, Any]) -> list[GenerationEvent]:
        if "error" in data and data["error"]:
            raise stream_error(data)
        try:
            token = data["token"]
            details = data.get("details")
            reason = None
            if isinstance(details, dict):
                reason = finish_reason(details.get("finish_reason") or "stop")
                self.usage = Usage(int(details.get("input_length") or 0), int(details.get("generated_tokens") or 0))
                self.done = True
            elif data.get("generated_text") is not None:  # the last event, from a server sending no details
                reason = FinishReason.STOP
                self.done = True
            delta = _tgi_token(token, data.get("top_tokens"))
            text = delta.text
            if self.stop_filter is not None:
                text = self.stop_filter.feed(text)
                if reason is not None:
                    text += self.stop_filter.flush()
            return [replace(delta, text=text, finish_reason=reason)]
        except (KeyError, TypeError, ValueError, AttributeError):
            raise malformed("stream event") from None

    def end(self) -> StreamEnd:
        return StreamEnd(self.usage)


def hf_embedding_result(data: Any, count: int) -> EmbeddingResult:
    """HF feature-extraction answers one pooled vector per input."""
    if not isinstance(data, list) or len(data) != count:
        raise malformed("feature-extraction response")
    try:
        vectors = [[float(v) for v in row] for row in data]
    except (TypeError, ValueError):
        raise malformed("feature-extraction response (expected one pooled vector per input)") from None
    return EmbeddingResult(vectors=vectors, usage=Usage())


# --- HF per-task endpoints -------------------------------------------------------------------------


def hf_task_body(inputs: Any, parameters: dict[str, Any]) -> dict[str, Any]:
    """`{"inputs", "parameters"}` for an HF endpoint. Media (an image's bytes) goes as a base64
    string, the form the hosted API takes inside JSON."""
    if isinstance(inputs, bytes):
        inputs = base64.b64encode(inputs).decode("ascii")
    body: dict[str, Any] = {"inputs": inputs}
    if parameters:
        body["parameters"] = parameters
    return body


def hf_probe(task: Task | None) -> dict[str, Any]:
    """The smallest real request to an HF endpoint, for a probe: one token at most when it generates.
    Whatever the task wants, any answer but 429 or 5xx shows the endpoint is serving again."""
    if task == Task.TEXT_GENERATION:
        return {"inputs": "ping", "parameters": {"max_new_tokens": 1}}
    return {"inputs": "ping"}

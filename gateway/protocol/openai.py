"""OpenAI wire schemas (requests) and their translation into domain types.

Extra-field policy: a field this server cannot honour is a 400 naming it, at any
depth (`stream_options.continuous_usage_stats`, `messages[1].tool_calls`). The
only fields accepted without effect are the ones that never change the output
(`NO_EFFECT_FIELDS`, a message's `name`); they are reported back in the
`x-gateway-ignored-params` response header. Fields equal to their neutral default
(`tools: []`, ...) are accepted, since they ask for nothing; the value must have the
neutral value's type too. A field declared on a request model (chat's `logprobs` and
`top_logprobs`, completions' `logprobs` and `echo`) is honoured and never reaches this policy.
"""

from __future__ import annotations

import base64
import json
from dataclasses import replace
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, field_validator

from gateway.config import KeepAlive
from gateway.domain import (
    SEED_MAX,
    SEED_MIN,
    ChatMessage,
    EmbeddingRequest,
    GenerationRequest,
    Grammar,
    SamplingParams,
    Tool,
    ToolCall,
    ToolChoice,
)
from gateway.errors import InvalidRequest, UnsupportedParameter

NO_EFFECT_FIELDS = frozenset({"user", "metadata", "store", "service_tier", "prompt_cache_key", "safety_identifier"})
# Fields the server knows but cannot honour, with the value that asks for nothing (for the
# endpoints that do not declare them: chat has no `echo`, completions no `top_logprobs`).
NEUTRAL_VALUES: dict[str, tuple[Any, ...]] = {
    "logprobs": (None, False),
    "top_logprobs": (None, 0),
    "functions": (None, []),
    "function_call": (None, "none", "auto"),
    "logit_bias": (None, {}),
    "echo": (None, False),
    "best_of": (None, 1),
    "suffix": (None, ""),
    "modalities": (None, ["text"]),
    "audio": (None,),
    "prediction": (None,),
    "reasoning_effort": (None,),
    "web_search_options": (None,),
}


# Stream options other servers know; none is implemented (usage on every chunk needs prompt
# counts mid-stream, which not every backend has), so only their "off" value is accepted.
STREAM_OPTION_NEUTRAL_VALUES: dict[str, tuple[Any, ...]] = {
    "continuous_usage_stats": (None, False),
    "include_obfuscation": (None, False),
}
# Fields of a chat message that belong to legacy function calling or to an earlier answer's
# extras; accepted only empty, as clients echo them back that way.
MESSAGE_NEUTRAL_VALUES: dict[str, tuple[Any, ...]] = {
    "function_call": (None,),
    "refusal": (None,),
    "audio": (None,),
    "annotations": (None, []),
}


def check_extras(
    extra: dict[str, Any],
    *,
    where: str,
    unknown: str,
    neutral: dict[str, tuple[Any, ...]] | None = None,
    no_effect: frozenset[str] = frozenset(),
) -> list[str]:
    """Apply the extra-field policy to one object's unknown fields; return the no-effect ones sent."""
    ignored = []
    for name, value in extra.items():
        param = where + name
        if name in no_effect:
            ignored.append(param)
        elif neutral and name in neutral:
            if not any(type(value) is type(n) and value == n for n in neutral[name]):
                raise UnsupportedParameter(param)
        else:
            raise UnsupportedParameter(param, unknown)
    return ignored


class _WireModel(BaseModel):
    model_config = ConfigDict(extra="allow")
    # Ollama's per-request keep_alive (an extension, sent through `extra_body`): how long the model
    # stays loaded after this request; seconds or "5m", negative for ever, 0 to unload when idle.
    keep_alive: KeepAlive = None

    def ignored_fields(self) -> list[str]:
        """Check the extra-field policy; return the no-effect fields that were sent."""
        return check_extras(
            self.model_extra or {},
            where="",
            no_effect=NO_EFFECT_FIELDS,
            neutral=NEUTRAL_VALUES,
            unknown="is not a known parameter of this endpoint",
        )


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="allow")
    include_usage: bool | None = False

    def check(self) -> None:
        check_extras(
            self.model_extra or {},
            where="stream_options.",
            neutral=STREAM_OPTION_NEUTRAL_VALUES,
            unknown="is not a known stream option",
        )


class JsonSchemaFormat(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)
    name: str = Field("response", min_length=1, max_length=64)
    description: str | None = None
    schema_: dict[str, Any] | None = Field(None, alias="schema")
    strict: bool | None = None


class ResponseFormat(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None

    def grammar(self) -> Grammar | None:
        """The constraint it asks for (None: plain text)."""
        if self.type == "text":
            return None
        if self.type == "json_object":
            return Grammar("json_object")
        if self.json_schema is None:
            raise InvalidRequest("response_format of type 'json_schema' needs 'json_schema'.", param="response_format")
        schema = self.json_schema.schema_ if self.json_schema.schema_ is not None else {}
        return Grammar("json_schema", json.dumps(schema), param="response_format.json_schema.schema")

    def wire(self) -> dict[str, Any]:
        return self.model_dump(by_alias=True, exclude_none=True)


class _SamplingFields(_WireModel):
    model: str = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    n: int = Field(1, ge=1, le=16)
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=SEED_MIN, le=SEED_MAX)
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    # Extensions many OpenAI-compatible servers take through `extra_body`.
    top_k: int | None = Field(None, ge=0)
    repetition_penalty: float | None = Field(None, gt=0)
    response_format: ResponseFormat | None = None

    @field_validator("stop")
    @classmethod
    def _at_most_four(cls, stop: str | list[str] | None) -> str | list[str] | None:
        if isinstance(stop, list) and len(stop) > 4:
            raise ValueError("at most 4 stop sequences")
        return stop

    def sampling(self, max_tokens: int | None) -> SamplingParams:
        stop = (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())
        return SamplingParams(
            max_tokens=max_tokens,
            temperature=1.0 if self.temperature is None else self.temperature,
            top_p=1.0 if self.top_p is None else self.top_p,
            top_k=self.top_k or 0,
            seed=self.seed,
            stop=stop,
            presence_penalty=self.presence_penalty or 0.0,
            frequency_penalty=self.frequency_penalty or 0.0,
            repetition_penalty=self.repetition_penalty or 1.0,
            n=self.n,
            grammar=self.response_format.grammar() if self.response_format is not None else None,
        )

    def response_format_wire(self) -> dict[str, Any] | None:
        """The response_format to hand an upstream unchanged (None when absent or plain text)."""
        if self.response_format is None or self.response_format.type == "text":
            return None
        return self.response_format.wire()

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)

    def ignored_fields(self) -> list[str]:
        ignored = super().ignored_fields()
        if self.stream_options is not None:
            if not self.stream:  # as OpenAI and vLLM answer
                raise InvalidRequest(
                    "The 'stream_options' parameter is only allowed when 'stream' is true.", param="stream_options"
                )
            self.stream_options.check()
        return ignored


class ContentPart(BaseModel):
    model_config = ConfigDict(extra="allow")
    type: str
    text: str | None = None


class ToolCallFunction(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Field(min_length=1)
    arguments: str


class ToolCallIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    id: str = Field(min_length=1)
    type: Literal["function"] = "function"
    function: ToolCallFunction


class ChatMessageIn(BaseModel):
    model_config = ConfigDict(extra="allow")
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCallIn] | None = None  # an earlier assistant answer's calls
    tool_call_id: str | None = None  # a tool message: the call it answers

    def ignored_fields(self, index: int) -> list[str]:
        where = f"messages[{index}]."
        if self.role == "tool" and not self.tool_call_id:
            raise InvalidRequest("A message with role 'tool' needs 'tool_call_id'.", param=where + "tool_call_id")
        if self.tool_calls and self.role != "assistant":
            raise InvalidRequest("Only assistant messages have 'tool_calls'.", param=where + "tool_calls")
        if self.tool_call_id is not None and self.role != "tool":
            raise InvalidRequest("Only tool messages have 'tool_call_id'.", param=where + "tool_call_id")
        check_extras(
            self.model_extra or {},
            where=where,
            neutral=MESSAGE_NEUTRAL_VALUES,
            unknown="is not a known field of a chat message",
        )
        for number, part in enumerate(self.content if isinstance(self.content, list) else ()):
            if part.type != "text":
                continue  # the type itself is refused by to_domain
            check_extras(
                part.model_extra or {},
                where=f"{where}content[{number}].",
                unknown="is not a known field of a content part",
            )
        # Chat templates take no participant names; one entry however many messages have one.
        return ["messages[].name"] if self.name is not None else []

    def to_domain(self, index: int) -> ChatMessage:
        if isinstance(self.content, list):
            for part in self.content:
                if part.type != "text":
                    raise UnsupportedParameter(f"messages[{index}].content[].type={part.type}")
            content = "".join(part.text or "" for part in self.content)
        else:
            content = self.content or ""
        role = "system" if self.role == "developer" else self.role
        calls = tuple(ToolCall(c.id, c.function.name, c.function.arguments) for c in self.tool_calls or ())
        if self.content is None and calls:
            return ChatMessage(role=role, content=None, tool_calls=calls)
        return ChatMessage(role=role, content=content, tool_calls=calls, tool_call_id=self.tool_call_id)


MAX_CHAT_TOP_LOGPROBS = 20  # OpenAI's limits
MAX_COMPLETION_LOGPROBS = 5


class FunctionDef(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Field(pattern=r"^[a-zA-Z0-9_.-]{1,64}$")
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class ToolDef(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["function"]
    function: FunctionDef

    def to_domain(self) -> Tool:
        f = self.function
        parameters = f.parameters if f.parameters is not None else {"type": "object", "properties": {}}
        return Tool(f.name, f.description or "", json.dumps(parameters), f.strict)


class NamedFunction(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str


class NamedToolChoice(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["function"]
    function: NamedFunction


_NO_TOOLS: dict[str, Any] = {"tools": (), "tool_choice": None, "parallel_tool_calls": None}


class _ToolFields(BaseModel):
    tools: list[ToolDef] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = None

    def tool_request(self) -> dict[str, Any]:
        """The GenerationRequest fields for tool calling (checked: a named choice must be a tool)."""
        if not self.tools and self.tool_choice is None and self.parallel_tool_calls is None:
            return _NO_TOOLS  # most requests
        tools = tuple(t.to_domain() for t in self.tools or ())
        choice = self.tool_choice
        if isinstance(choice, NamedToolChoice):
            if choice.function.name not in {t.name for t in tools}:
                raise InvalidRequest(
                    f"tool_choice names the function '{choice.function.name}', which is not in 'tools'.",
                    param="tool_choice",
                )
            domain_choice: ToolChoice | None = ToolChoice("required", choice.function.name)
        elif choice is not None:
            if choice == "required" and not tools:
                raise InvalidRequest("tool_choice 'required' needs at least one tool in 'tools'.", param="tool_choice")
            domain_choice = ToolChoice(choice)
        else:
            domain_choice = None
        return {"tools": tools, "tool_choice": domain_choice, "parallel_tool_calls": self.parallel_tool_calls}


class ChatCompletionRequest(_SamplingFields, _ToolFields):
    messages: list[ChatMessageIn] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: StrictBool | None = None
    top_logprobs: StrictInt | None = Field(None, ge=0, le=MAX_CHAT_TOP_LOGPROBS)

    def _with_logprobs(self, sampling: SamplingParams) -> SamplingParams:
        if self.top_logprobs and not self.logprobs:  # as OpenAI answers
            raise InvalidRequest("'top_logprobs' needs 'logprobs' set to true.", param="top_logprobs")
        if not self.logprobs:
            return sampling
        return replace(sampling, logprobs=True, top_n=self.top_logprobs or 0)

    def ignored_fields(self) -> list[str]:
        ignored = super().ignored_fields()
        for index, message in enumerate(self.messages):
            ignored += [name for name in message.ignored_fields(index) if name not in ignored]
        return ignored

    def to_domain(self, request_id: str) -> GenerationRequest:
        if self.max_tokens is not None and self.max_completion_tokens is not None:
            if self.max_tokens != self.max_completion_tokens:
                raise InvalidRequest(
                    "Give max_completion_tokens or max_tokens, not both with different values.",
                    param="max_completion_tokens",
                )
        limit = self.max_completion_tokens or self.max_tokens
        messages = tuple(m.to_domain(i) for i, m in enumerate(self.messages))
        return GenerationRequest(
            sampling=self._with_logprobs(self.sampling(limit)),
            messages=messages,
            request_id=request_id,
            response_format=self.response_format_wire(),
            **self.tool_request(),
        )


class CompletionRequest(_SamplingFields):
    prompt: str | list[str] | list[int] | list[list[int]]
    # the OpenAI default for this endpoint; 0 only with `echo`, to score the prompt alone
    max_tokens: int | None = Field(16, ge=0)
    # the chosen token's log-probability and the `logprobs` most likely ones at each step
    logprobs: StrictInt | None = Field(None, ge=0, le=MAX_COMPLETION_LOGPROBS)
    echo: StrictBool | None = False  # the prompt before each choice's text (and its tokens' logprobs)

    def prompts(self) -> list[str | list[int]]:
        p = self.prompt
        if isinstance(p, str):
            return [p]
        if p and all(isinstance(x, int) for x in p):
            return [list(p)]  # type: ignore[arg-type]
        if not p:
            raise InvalidRequest("The prompt is empty.", param="prompt")
        return list(p)  # type: ignore[arg-type]

    def to_domain(self, request_id: str) -> list[GenerationRequest]:
        if self.max_tokens == 0 and not self.echo:
            raise InvalidRequest(
                "max_tokens must be at least 1 (0 only with echo, to score the prompt).", param="max_tokens"
            )
        sampling = self.sampling(self.max_tokens)
        if self.logprobs is not None:
            sampling = replace(sampling, logprobs=True, top_n=self.logprobs)
        echo = bool(self.echo)
        response_format = self.response_format_wire()
        return [
            GenerationRequest(
                sampling=sampling, prompt=p, request_id=request_id, echo=echo, response_format=response_format
            )
            for p in self.prompts()
        ]


class EmbeddingsRequest(_WireModel):
    model: str = Field(min_length=1)
    input: str | list[str] | list[int] | list[list[int]]
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = Field(None, ge=1)

    def to_domain(self) -> EmbeddingRequest:
        data = self.input
        if isinstance(data, str):
            inputs: tuple[Any, ...] = (data,)
        elif data and all(isinstance(x, int) for x in data):
            inputs = (list(data),)
        else:
            inputs = tuple(data)
        if not inputs or any(not x for x in inputs):
            raise InvalidRequest(
                "Input must be a non-empty string, a non-empty list of token IDs, or a list of them.", param="input"
            )
        if len(inputs) > 2048:
            raise InvalidRequest("At most 2048 inputs per request.", param="input")
        for index, item in enumerate(inputs):
            if isinstance(item, list):
                bad = next((t for t in item if not 0 <= t < 2**63), None)
                if bad is not None:  # the backend checks the model's vocabulary; this keeps huge ints out of torch
                    shown = bad if -(2**63) <= bad < 2**63 else "beyond the 64-bit range"
                    raise InvalidRequest(f"Input {index} has an invalid token ID ({shown}).", param="input")
        # OpenAI refuses an input longer than the model accepts rather than embedding part of it.
        return EmbeddingRequest(inputs=inputs, dimensions=self.dimensions, truncate=False)


def encode_embedding(vector: list[float], encoding_format: str) -> list[float] | str:
    if encoding_format == "base64":
        import numpy as np

        return base64.b64encode(np.asarray(vector, dtype="<f4").tobytes()).decode("ascii")
    return vector

"""Text Generation Inference (TGI) wire format: parameters, responses and stream events.

Sampling follows TGI: `do_sample` true samples, false is greedy, and unset samples
exactly when a sampling setting (temperature != 1, top_k, top_p < 1) is given. A
parameter TGI has but this server cannot honour is a validation error naming it.
"""

from __future__ import annotations

import json
import secrets
from collections.abc import AsyncIterator, Iterable
from typing import TYPE_CHECKING, Any, Literal, NamedTuple

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from gateway import __version__
from gateway.domain import (
    SEED_MAX,
    FinishReason,
    GenerationEvent,
    GenerationRequest,
    GenerationResult,
    Grammar,
    ModelState,
    SamplingParams,
    StreamEnd,
    Task,
    TokenDelta,
    Usage,
)
from gateway.errors import InvalidRequest, UnsupportedParameter
from gateway.protocol.hf import HFCall, exact_integer, parse_call, read_body
from gateway.validation import format_errors

if TYPE_CHECKING:
    from gateway.backends.base import ModelInfo

DEFAULT_MAX_NEW_TOKENS = 100  # TGI's default when a request does not say
MAX_TOP_N_TOKENS = 5  # TGI's default --max-top-n-tokens

TGI_FINISH = {
    FinishReason.LENGTH: "length",
    FinishReason.EOS: "eos_token",
    FinishReason.STOP: "stop_sequence",
    FinishReason.TOOL_CALLS: "eos_token",  # (never on TGI routes, which take no tools)
}

# TGI parameters this server cannot honour, with the values that ask for nothing.
_NEUTRAL: dict[str, tuple[Any, ...]] = {
    "best_of": (None, 1),
    "watermark": (None, False),
    "typical_p": (None, 1.0),
}


class TGIGrammar(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["json", "json_object", "json_schema", "regex"]
    value: dict[str, Any] | str

    def to_domain(self) -> Grammar:
        param = "parameters.grammar.value"
        if self.type == "regex":
            if not isinstance(self.value, str):
                raise InvalidRequest("A regex grammar's value must be a string.", param=param)
            return Grammar("regex", self.value, param=param)
        schema = self.value
        if isinstance(schema, str):
            try:
                schema = json.loads(schema)
            except ValueError as exc:
                raise InvalidRequest(f"The grammar's JSON schema is not JSON: {exc}.", param=param) from exc
        return Grammar("json_schema", json.dumps(schema), param=param)


class TGIParameters(BaseModel):
    model_config = ConfigDict(extra="forbid")

    max_new_tokens: int | None = Field(None, ge=1)
    truncate: int | None = Field(None, ge=1)
    decoder_input_details: bool = False
    top_n_tokens: int | None = Field(None, ge=0, le=MAX_TOP_N_TOKENS)
    temperature: float | None = Field(None, gt=0)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, gt=0)
    repetition_penalty: float | None = Field(None, gt=0)
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    do_sample: bool | None = None
    seed: int | None = Field(None, ge=0, le=SEED_MAX)  # TGI's seeds are unsigned; ours also fit in int64
    stop: list[str] | None = None
    return_full_text: bool | None = None
    details: bool = False
    # Known to TGI, refused here unless neutral (see _NEUTRAL).
    best_of: int | None = None
    watermark: bool | None = None
    typical_p: float | None = None
    adapter_id: str | None = None  # a served adapter model's name (services/tgi resolves it)
    grammar: TGIGrammar | None = None  # constrained decoding: TGI's json (a schema) or regex

    _exact_seed = field_validator("seed", mode="before")(exact_integer)

    @field_validator("stop", mode="before")
    @classmethod
    def _stop_list(cls, value: Any) -> Any:
        if isinstance(value, str):
            value = [value]
        if isinstance(value, list) and len(value) > 4:
            raise ValueError("at most 4 stop sequences")
        return value

    def check_supported(self) -> None:
        for name, neutral in _NEUTRAL.items():
            if getattr(self, name) not in neutral:
                raise UnsupportedParameter(name, "is not supported by this server")

    @property
    def samples(self) -> bool:
        if self.do_sample is not None:
            return self.do_sample
        return (
            (self.temperature is not None and self.temperature != 1.0)
            or bool(self.top_k)
            or (self.top_p is not None and self.top_p < 1.0)
        )

    def to_domain(self, prompt: str, request_id: str) -> GenerationRequest:
        sample = self.samples
        seed = self.seed
        if sample and seed is None:
            seed = secrets.randbits(32)  # chosen here so the response can report it, as TGI does
        sampling = SamplingParams(
            max_tokens=self.max_new_tokens or DEFAULT_MAX_NEW_TOKENS,
            temperature=(self.temperature or 1.0) if sample else 0.0,
            top_p=self.top_p or 1.0,
            top_k=self.top_k or 0,
            seed=seed,
            stop=tuple(self.stop or ()),
            frequency_penalty=self.frequency_penalty or 0.0,
            repetition_penalty=self.repetition_penalty or 1.0,
            top_n=self.top_n_tokens or 0,
            grammar=self.grammar.to_domain() if self.grammar is not None else None,
        )
        return GenerationRequest(
            sampling=sampling, prompt=prompt, request_id=request_id, truncate=self.truncate, keep_stop=True
        )


def parse_parameters(raw: Any) -> TGIParameters:
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise InvalidRequest("'parameters' must be an object.", param="parameters")
    try:
        params = TGIParameters.model_validate(raw)
    except ValidationError as exc:
        first = format_errors(exc.errors()[:1], root="parameters", unknown_msg="is not a text-generation parameter")[0]
        raise InvalidRequest(f"Invalid '{first.param}': {first.message}.", param=first.param) from exc
    params.check_supported()
    return params


def adapter_of(parameters: Any) -> str | None:
    """TGI's `adapter_id`, read before the parameters are (it picks the model they are judged for)."""
    adapter = parameters.get("adapter_id") if isinstance(parameters, dict) else None
    return adapter if isinstance(adapter, str) and adapter else None


def reserved_tokens(parameters: Any, prompts: int, *, default: int = DEFAULT_MAX_NEW_TOKENS) -> int:
    """Tokens a key's limit reserves before the parameters are judged: `max_new_tokens` as sent
    (else `default`) for each prompt; settled with the real count when the answer is done."""
    asked = parameters.get("max_new_tokens") if isinstance(parameters, dict) else None
    per_prompt = asked if isinstance(asked, int) and not isinstance(asked, bool) and asked > 0 else default
    return per_prompt * max(prompts, 1)


def read_call(raw: bytes) -> HFCall:
    """A TGI route's body: always JSON, whatever its content type says."""
    return parse_call(read_body(raw, "application/json"), Task.TEXT_GENERATION)


def prompts(inputs: Any) -> tuple[list[str], bool]:
    """The prompts of a request and whether `inputs` was a list."""
    if isinstance(inputs, str):
        return [inputs], False
    if isinstance(inputs, list) and inputs and all(isinstance(x, str) for x in inputs):
        if len(inputs) > 64:
            raise InvalidRequest("At most 64 prompts per request.", param="inputs")
        return list(inputs), True
    raise InvalidRequest("'inputs' must be a string or a non-empty list of strings.", param="inputs")


def check_streamable(params: TGIParameters, many: bool) -> None:
    """What a TGI stream cannot carry: several prompts, or the prompt's own token details."""
    if many:
        raise InvalidRequest("Streaming takes a single prompt; send a string as 'inputs'.", param="inputs")
    if params.decoder_input_details:
        raise InvalidRequest(
            "decoder_input_details is not available when streaming (as in TGI).", param="decoder_input_details"
        )


# responses ------------------------------------------------------------------
def token_body(delta: TokenDelta) -> dict[str, Any]:
    return {"id": delta.token_id, "text": delta.text, "logprob": delta.logprob, "special": delta.special}


def top_body(delta: TokenDelta) -> list[dict[str, Any]]:
    return [{"id": t.token_id, "text": t.text, "logprob": t.logprob, "special": t.special} for t in delta.top]


def generated(prompt: str, text: str, params: TGIParameters) -> str:
    return prompt + text if params.return_full_text else text


def details_body(
    tokens: list[TokenDelta],
    finish: FinishReason | None,
    seed: int | None,
    prefill: list[TokenDelta],
    top_n: int = 0,
    generated: int = 0,
) -> dict[str, Any]:
    """`generated`: the usage's count, for a backend whose whole answer has no per-token list."""
    return {
        "finish_reason": TGI_FINISH[finish] if finish is not None else "length",
        "generated_tokens": len(tokens) or generated,
        "seed": seed,
        "prefill": [{"id": t.token_id, "text": t.text, "logprob": t.logprob} for t in prefill],
        "tokens": [token_body(t) for t in tokens],
        "top_tokens": [top_body(t) for t in tokens] if top_n else None,
        "best_of_sequences": None,
    }


def stream_event(
    index: int, delta: TokenDelta, *, generated_text: str | None = None, details: dict[str, Any] | None = None
) -> dict[str, Any]:
    return {
        "index": index,
        "token": token_body(delta),
        "generated_text": generated_text,
        "details": details,
        "top_tokens": top_body(delta) if delta.top else None,
    }


class Generated(NamedTuple):
    """One prompt's answer, as the services hand it over."""

    prompt: str
    result: GenerationResult
    seed: int | None  # what sampling used (None when greedy): TGI reports it
    prefill: list[TokenDelta]  # the prompt's tokens, when decoder_input_details asked for them


def generation_body(answer: Generated, params: TGIParameters) -> dict[str, Any]:
    choice = answer.result.choices[0]
    body: dict[str, Any] = {"generated_text": generated(answer.prompt, choice.text, params)}
    if params.details:
        body["details"] = details_body(
            choice.tokens,
            choice.finish_reason,
            answer.seed,
            answer.prefill,
            params.top_n_tokens or 0,
            generated=answer.result.usage.completion_tokens,
        )
    return body


def generation_response(
    results: Iterable[Generated], params: TGIParameters, *, single: bool
) -> tuple[Any, dict[str, str]]:
    """The body (one object when `single`, else a list) and, as TGI sends them, the token counts
    in headers (its non-streamed details carry no input length)."""
    bodies, usage = [], Usage()
    for result in results:
        bodies.append(generation_body(result, params))
        usage.add(result.result.usage)
    headers = {"x-prompt-tokens": str(usage.prompt_tokens), "x-generated-tokens": str(usage.completion_tokens)}
    return (bodies[0] if single else bodies), headers


async def stream_events(
    events: AsyncIterator[GenerationEvent], prompt: str, params: TGIParameters, seed: int | None
) -> AsyncIterator[dict[str, Any]]:
    """TGI stream events. Each token is sent once the next event arrives: the last one carries
    generated_text and details, which need the usage that ends the stream."""
    pending: TokenDelta | None = None
    end: StreamEnd | None = None
    count, text = 0, ""
    try:
        async for event in events:
            if isinstance(event, StreamEnd):
                end = event
                break
            if not isinstance(event, TokenDelta):
                continue  # (tool calls: never on a TGI route)
            if pending is not None:
                yield stream_event(count, pending)
            count += 1
            text += event.text
            pending = event
    except Exception:
        if pending is not None:  # the tokens made before a failure still reach the client
            yield stream_event(count, pending)
        raise
    if pending is None:
        return
    details = None
    if params.details:
        details = {
            "finish_reason": TGI_FINISH[pending.finish_reason] if pending.finish_reason else "length",
            "generated_tokens": count,
            "input_length": end.usage.prompt_tokens if end is not None else None,
            "seed": seed,
        }
    yield stream_event(count, pending, generated_text=generated(prompt, text, params), details=details)


def info_body(name: str, info: ModelInfo, state: ModelState, task: Task | None) -> dict[str, Any]:
    """TGI/TEI-style endpoint info."""
    return {
        "model_id": name,
        "model_sha": None,
        "model_dtype": info.dtype,
        "model_device_type": info.device,
        "model_pipeline_tag": task.value if task else None,
        "max_input_tokens": info.max_input_tokens,
        "max_input_length": info.max_input_tokens,
        "max_total_tokens": info.max_total_tokens,
        "max_best_of": 1,
        "max_stop_sequences": 4,
        "state": state.value,
        "router": "gateway",
        "version": __version__,
        "sha": None,
        "docker_label": None,
    }

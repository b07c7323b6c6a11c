"""Hugging Face Inference API wire format: request bodies, per-task parameters, response shapes.

A request is `{"inputs": X, "parameters": {...}, "options": {...}}` (feature-extraction
takes its parameters at the top level), a bare JSON value taken as `inputs`, or, for image
tasks, the raw image bytes. Parameters are checked per task here; what reaches the backend
is a `TaskRequest` whose `inputs` is the list of items and whose `parameters` are plain values.
"""

from __future__ import annotations

import base64
import binascii
from dataclasses import dataclass
from typing import Any, Literal

import orjson
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from gateway.domain import SEED_MAX, SEED_MIN, Task, TaskRequest
from gateway.errors import GatewayError, InvalidRequest
from gateway.validation import format_errors

MEDIA_TASKS = frozenset({Task.IMAGE_CLASSIFICATION})


class _Params(BaseModel):
    model_config = ConfigDict(extra="forbid")


def exact_integer(value: Any) -> Any:
    """A `before` validator for integers that must be exact (seeds): orjson reads a JSON integer
    past 64 bits as a float, so a float here may not be the number the client sent."""
    if isinstance(value, (float, bool)):
        raise ValueError("must be an integer within 64 bits")
    return value


class Options(_Params):
    """The hosted API's legacy options."""

    wait_for_model: bool | None = Field(
        None, description="false: answer 503 with `estimated_time` while the model loads; true or unset: wait."
    )
    use_cache: bool | None = Field(None, description="Accepted; a no-op until the response cache exists.")


class TextClassificationParams(_Params):
    top_k: int | None = Field(None, ge=1)
    function_to_apply: Literal["sigmoid", "softmax", "none"] | None = None


ImageClassificationParams = TextClassificationParams


class TokenClassificationParams(_Params):
    aggregation_strategy: Literal["none", "simple", "first", "average", "max"] | None = None
    ignore_labels: list[str] | None = None
    stride: int | None = Field(None, ge=0)

    @model_validator(mode="after")
    def _stride_needs_aggregation(self) -> TokenClassificationParams:
        if self.stride and self.aggregation_strategy == "none":
            raise ValueError("stride needs an aggregation_strategy other than 'none'")
        return self


class ZeroShotParams(_Params):
    candidate_labels: list[str] = Field(min_length=1)
    multi_label: bool = False
    hypothesis_template: str | None = None

    @field_validator("candidate_labels", mode="before")
    @classmethod
    def _comma_separated(cls, value: Any) -> Any:
        if isinstance(value, str):  # the hosted API took "a, b, c"
            return [label.strip() for label in value.split(",") if label.strip()]
        return value

    @field_validator("hypothesis_template")
    @classmethod
    def _has_slot(cls, value: str | None) -> str | None:
        if value is not None and "{}" not in value:
            raise ValueError("hypothesis_template must contain '{}' where the label goes")
        return value


class FillMaskParams(_Params):
    top_k: int | None = Field(None, ge=1)
    targets: list[str] | None = None

    @field_validator("targets", mode="before")
    @classmethod
    def _one_target(cls, value: Any) -> Any:
        return [value] if isinstance(value, str) else value


class QuestionAnsweringParams(_Params):
    top_k: int | None = Field(None, ge=1)
    doc_stride: int | None = Field(None, ge=0)
    max_answer_len: int | None = Field(None, ge=1)
    max_seq_len: int | None = Field(None, ge=16)
    max_question_len: int | None = Field(None, ge=1)
    handle_impossible_answer: bool | None = None
    align_to_words: bool | None = None


class GenerateParameters(_Params):
    """What `generate` takes for the encoder-decoder tasks."""

    max_new_tokens: int | None = Field(None, ge=1, le=4096)
    min_new_tokens: int | None = Field(None, ge=0)
    max_length: int | None = Field(None, ge=1, le=4096)
    min_length: int | None = Field(None, ge=0)
    do_sample: bool | None = None
    temperature: float | None = Field(None, gt=0)
    top_k: int | None = Field(None, ge=0)
    top_p: float | None = Field(None, gt=0, le=1)
    typical_p: float | None = Field(None, gt=0, le=1)
    num_beams: int | None = Field(None, ge=1, le=16)
    num_beam_groups: int | None = Field(None, ge=1)
    early_stopping: bool | Literal["never"] | None = None
    length_penalty: float | None = None
    no_repeat_ngram_size: int | None = Field(None, ge=0)
    repetition_penalty: float | None = Field(None, gt=0)
    epsilon_cutoff: float | None = Field(None, ge=0, lt=1)
    eta_cutoff: float | None = Field(None, ge=0, lt=1)
    penalty_alpha: float | None = Field(None, ge=0)
    use_cache: bool | None = None
    seed: int | None = Field(None, ge=SEED_MIN, le=SEED_MAX)

    _exact_seed = field_validator("seed", mode="before")(exact_integer)


class Seq2SeqParams(_Params):
    generate_parameters: GenerateParameters | None = None
    truncation: Literal["do_not_truncate", "longest_first", "only_first", "only_second"] | None = None
    clean_up_tokenization_spaces: bool | None = None


class TranslationParams(Seq2SeqParams):
    src_lang: str | None = None
    tgt_lang: str | None = None


class FeatureExtractionParams(_Params):
    normalize: bool | None = None
    truncate: bool | None = None
    truncation_direction: Literal["right", "Right"] | None = Field(
        None, description="Only right truncation (keep the start) is implemented."
    )
    dimensions: int | None = Field(None, ge=1)
    prompt_name: None = Field(None, description="No prompts are configured on this server.")
    encoding_format: Literal["float"] | None = None


class SentenceSimilarityParams(_Params):
    pass


PARAMS: dict[Task, type[_Params]] = {
    Task.TEXT_CLASSIFICATION: TextClassificationParams,
    Task.IMAGE_CLASSIFICATION: ImageClassificationParams,
    Task.TOKEN_CLASSIFICATION: TokenClassificationParams,
    Task.ZERO_SHOT_CLASSIFICATION: ZeroShotParams,
    Task.FILL_MASK: FillMaskParams,
    Task.QUESTION_ANSWERING: QuestionAnsweringParams,
    Task.SUMMARIZATION: Seq2SeqParams,
    Task.TEXT2TEXT_GENERATION: Seq2SeqParams,
    Task.TRANSLATION: TranslationParams,
    Task.FEATURE_EXTRACTION: FeatureExtractionParams,
    Task.SENTENCE_SIMILARITY: SentenceSimilarityParams,
}
_TOP_LEVEL = frozenset({"inputs", "parameters", "options", "stream"})


def error_body(exc: GatewayError) -> dict[str, Any]:
    """The HF/TGI error envelope: `{"error": "...", "error_type": "..."}` (+ `estimated_time` while loading)."""
    # huggingface_hub's text_generation retries itself, recursively, whenever an error names unused
    # `model_kwargs` (it assumes a non-TGI server); that word must never reach an HF client.
    message = exc.message.replace("model_kwargs", "model arguments")
    body: dict[str, Any] = {"error": message, "error_type": exc.hf_error_type}
    estimated = getattr(exc, "estimated_time", None)
    if estimated is not None:
        body["estimated_time"] = estimated
    return body


def parse_task(name: str) -> Task:
    """The task a /pipeline/{task}/... URL forces."""
    try:
        return Task(name)
    except ValueError:
        served = ", ".join(t.value for t in Task)
        raise InvalidRequest(f"Unknown task '{name}'. Tasks: {served}.", param="task") from None


@dataclass
class RawMedia:
    """A request body that is not JSON: the bytes of an image (or other media)."""

    data: bytes


@dataclass
class HFCall:
    """One parsed request to a task route."""

    inputs: Any
    parameters: dict[str, Any]
    options: Options
    stream: bool | None = None


def _validation(exc: ValidationError, where: str) -> InvalidRequest:
    first = format_errors(exc.errors()[:1], root=where, unknown_msg="is not a parameter of this task")[0]
    return InvalidRequest(f"Invalid '{first.param}': {first.message}.", param=first.param)


def read_body(raw: bytes, content_type: str | None) -> Any:
    """The JSON value of a body, or RawMedia when the body is not JSON (raw image bytes)."""
    kind = (content_type or "").split(";")[0].strip().lower()
    if kind.startswith(("image/", "audio/", "video/")) or kind == "application/octet-stream":
        return RawMedia(raw)
    if not raw.strip():
        raise InvalidRequest("The request body is empty; send JSON with `inputs`.", param="inputs")
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        if kind == "application/json":
            raise InvalidRequest(f"The body is not valid JSON: {exc}.") from exc
        return RawMedia(raw)


def options_of(body: Any) -> Options:
    """The legacy `options` of a body (read before the task is known: wait_for_model decides the wait)."""
    raw = body.get("options") if isinstance(body, dict) and "inputs" in body else None
    try:
        return Options.model_validate(raw or {})
    except ValidationError as exc:
        raise _validation(exc, "options") from exc


def parse_call(body: Any, task: Task | None) -> HFCall:
    """Split a body into inputs, parameters and options (parameters are checked by `task_request`)."""
    if isinstance(body, RawMedia):
        return HFCall(inputs=body, parameters={}, options=Options())
    if not isinstance(body, dict) or "inputs" not in body:
        # a bare JSON value is the inputs (the hosted API took `"some text"`)
        return HFCall(inputs=body, parameters={}, options=Options())
    parameters = body.get("parameters") or {}
    if not isinstance(parameters, dict):
        raise InvalidRequest("'parameters' must be an object.", param="parameters")
    extra = {k: v for k, v in body.items() if k not in _TOP_LEVEL}
    if extra:
        if task not in (Task.FEATURE_EXTRACTION, Task.SENTENCE_SIMILARITY):  # embedding models serve both
            name = next(iter(extra))
            raise InvalidRequest(f"Unknown field '{name}' in the request body.", param=name)
        parameters = {**parameters, **extra}  # feature-extraction sends its parameters at the top level
    options = options_of(body)
    stream = body.get("stream")
    if stream is not None and not isinstance(stream, bool):
        raise InvalidRequest("'stream' must be true or false.", param="stream")
    return HFCall(inputs=body["inputs"], parameters=parameters, options=options, stream=stream)


# inputs ---------------------------------------------------------------------
def _texts(inputs: Any) -> tuple[list[str], bool]:
    if isinstance(inputs, str):
        items, many = [inputs], False
    elif isinstance(inputs, list) and inputs and all(isinstance(x, str) for x in inputs):
        items, many = list(inputs), True
    else:
        raise InvalidRequest("'inputs' must be a string or a non-empty list of strings.", param="inputs")
    if any(not text for text in items):
        raise InvalidRequest("'inputs' must not contain empty strings.", param="inputs")
    return items, many


def _objects(inputs: Any, keys: dict[str, type], example: str) -> tuple[list[dict[str, Any]], bool]:
    many = isinstance(inputs, list)
    items = inputs if many else [inputs]
    if not items:
        raise InvalidRequest(f"'inputs' must be {example} or a non-empty list of them.", param="inputs")
    for item in items:
        if not isinstance(item, dict) or any(
            not isinstance(item.get(k), t) or not item.get(k) for k, t in keys.items()
        ):
            raise InvalidRequest(f"'inputs' must be {example} or a list of them.", param="inputs")
    return [{k: item[k] for k in keys} for item in items], many


def _images(inputs: Any) -> tuple[list[bytes], bool]:
    if isinstance(inputs, RawMedia):
        return [inputs.data], False
    many = isinstance(inputs, list)
    items = inputs if many else [inputs]
    if not items or not all(isinstance(x, str) and x for x in items):
        raise InvalidRequest(
            "'inputs' must be base64-encoded image data (or send the raw image bytes as the body).", param="inputs"
        )
    decoded = []
    for item in items:
        data = item.split(",", 1)[1] if item.startswith("data:") else item  # data URLs too
        try:
            decoded.append(base64.b64decode(data, validate=True))
        except (binascii.Error, ValueError) as exc:
            raise InvalidRequest("'inputs' is not valid base64.", param="inputs") from exc
    return decoded, many


def split_inputs(task: Task, inputs: Any) -> tuple[list[Any], bool]:
    """The items of a request and whether `inputs` was a list (one output per item then)."""
    if isinstance(inputs, RawMedia) and task not in MEDIA_TASKS:
        raise InvalidRequest(f"The body must be JSON for the task '{task.value}'.", param="inputs")
    if task in MEDIA_TASKS:
        return _images(inputs)
    if task == Task.QUESTION_ANSWERING:
        return _objects(inputs, {"question": str, "context": str}, '{"question": ..., "context": ...}')
    if task == Task.SENTENCE_SIMILARITY:
        items, many = _objects(
            inputs, {"source_sentence": str, "sentences": list}, '{"source_sentence": ..., "sentences": [...]}'
        )
        for item in items:
            if not all(isinstance(s, str) and s for s in item["sentences"]):
                raise InvalidRequest("'sentences' must be a list of non-empty strings.", param="inputs.sentences")
        return items, many
    return _texts(inputs)


def task_request(task: Task, call: HFCall) -> tuple[TaskRequest, bool]:
    if call.stream:  # only text generation streams; a JSON answer would give a streaming client nothing
        raise InvalidRequest(f"The task '{task.value}' does not stream; leave out 'stream'.", param="stream")
    schema = PARAMS.get(task)
    if schema is None:
        raise InvalidRequest(f"The task '{task.value}' has no parameters schema.", param="task")
    try:
        params = schema.model_validate(call.parameters).model_dump(exclude_none=True)
    except ValidationError as exc:
        raise _validation(exc, "parameters") from exc
    items, many = split_inputs(task, call.inputs)
    if len(items) > 256:
        raise InvalidRequest("At most 256 inputs per request.", param="inputs")
    return TaskRequest(task=task, inputs=items, parameters=params), many


# outputs --------------------------------------------------------------------
ALWAYS_LIST = frozenset(
    {
        Task.TEXT_CLASSIFICATION,  # [[{label, score}, ...]] even for one text
        Task.SUMMARIZATION,
        Task.TRANSLATION,
        Task.TEXT2TEXT_GENERATION,
        Task.FEATURE_EXTRACTION,  # [[...vector...]]
    }
)


def shape_output(task: Task, outputs: list[Any], many: bool) -> Any:
    """What the hosted API returns: for most tasks one output for one input, a list for a list."""
    if many or task in ALWAYS_LIST:
        return outputs
    return outputs[0]

"""Domain types shared by the HTTP layer and the backends.

Nothing here knows about HTTP or about any wire format: routes translate wire
schemas into these, backends consume and produce them.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any


class Task(str, enum.Enum):
    """What a model does; the names follow `transformers.pipeline` tasks."""

    TEXT_GENERATION = "text-generation"
    FEATURE_EXTRACTION = "feature-extraction"
    TEXT2TEXT_GENERATION = "text2text-generation"
    SUMMARIZATION = "summarization"
    TRANSLATION = "translation"
    TEXT_CLASSIFICATION = "text-classification"
    TOKEN_CLASSIFICATION = "token-classification"
    ZERO_SHOT_CLASSIFICATION = "zero-shot-classification"
    FILL_MASK = "fill-mask"
    QUESTION_ANSWERING = "question-answering"
    SENTENCE_SIMILARITY = "sentence-similarity"
    IMAGE_CLASSIFICATION = "image-classification"


# Embedding models serve both: sentence-similarity is cosine similarity of embeddings.
EMBEDDING_TASKS = (Task.FEATURE_EXTRACTION, Task.SENTENCE_SIMILARITY)


class ModelState(str, enum.Enum):
    PENDING = "pending"  # lazily loaded, not asked for yet
    LOADING = "loading"
    READY = "ready"
    UNLOADING = "unloading"  # finishing its in-flight requests before it is freed; new ones get 503
    FAILED = "failed"


class FinishReason(str, enum.Enum):
    STOP = "stop"  # a stop sequence was produced
    EOS = "eos"  # the model produced its end-of-sequence token
    LENGTH = "length"  # the token budget ran out
    TOOL_CALLS = "tool_calls"  # the answer is one or more tool calls

    @property
    def openai(self) -> str:
        """OpenAI has no separate reason for end-of-sequence: both ends are "stop"."""
        if self is FinishReason.LENGTH or self is FinishReason.TOOL_CALLS:
            return self.value
        return "stop"


# Seeds are 64-bit signed integers, the range OpenAI accepts; a larger one overflows a sampler's generator.
SEED_MIN, SEED_MAX = -(2**63), 2**63 - 1


@dataclass(frozen=True)
class Grammar:
    """A constraint on the generated text, enforced token by token (constrained decoding).

    `kind` "json_schema" (value: the schema as JSON text), "json_object" (any JSON object),
    "regex" or "lark" (value: the pattern or grammar). `param` names the request field it came
    from, for the error that refuses a grammar that cannot be compiled.
    """

    kind: str
    value: str = ""
    param: str = "response_format"


@dataclass(frozen=True)
class SamplingParams:
    """Per-request decoding settings. `temperature == 0` means greedy."""

    max_tokens: int | None = None
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    n: int = 1
    top_n: int = 0  # also report the n most likely tokens at each step (TGI's top_n_tokens)
    # OpenAI's logprobs: each chosen token's log-probability under the model's raw distribution
    # (before penalties, temperature, top-k and top-p, as OpenAI and vLLM report it), with the
    # token's own text and bytes (TokenDelta.own); TGI's details keep the distribution sampled from.
    logprobs: bool = False
    grammar: Grammar | None = None  # constrained decoding: the output matches it

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


@dataclass(frozen=True)
class ToolCall:
    """One function call of an assistant message; `arguments` is JSON text."""

    id: str
    name: str
    arguments: str


@dataclass(frozen=True)
class Tool:
    """A function the model may call; `parameters` is its JSON schema as JSON text."""

    name: str
    description: str = ""
    parameters: str = '{"type": "object", "properties": {}}'
    strict: bool | None = None


@dataclass(frozen=True)
class ToolChoice:
    """`mode` none, auto or required; `name` set when one named function must be called."""

    mode: str = "auto"
    name: str | None = None


@dataclass(frozen=True)
class ChatMessage:
    role: str
    content: str | None
    tool_calls: tuple[ToolCall, ...] = ()
    tool_call_id: str | None = None


@dataclass(frozen=True)
class GenerationRequest:
    """Either `messages` (chat, templated by the backend) or `prompt` (raw text or token ids)."""

    sampling: SamplingParams
    messages: tuple[ChatMessage, ...] | None = None
    prompt: str | list[int] | None = None
    request_id: str = ""
    truncate: int | None = None  # keep only the last N prompt tokens (TGI's `truncate`)
    # TGI keeps the matched stop sequence at the end of the text; OpenAI drops it.
    keep_stop: bool = False
    # OpenAI completions' `echo`: each choice starts with the prompt's tokens (TokenDelta.echoed),
    # with their log-probabilities when `sampling.logprobs`; usage counts them as prompt only.
    echo: bool = False
    tools: tuple[Tool, ...] = ()
    tool_choice: ToolChoice | None = None  # None: not given (auto when there are tools)
    parallel_tool_calls: bool | None = None
    # the client's response_format as sent (an upstream of the OpenAI dialect gets it unchanged)
    response_format: dict[str, Any] | None = None

    @property
    def calls_tools(self) -> bool:
        """Whether the answer may be tool calls."""
        return bool(self.tools) and (self.tool_choice is None or self.tool_choice.mode != "none")


@dataclass(frozen=True)
class TokenDelta:
    """A piece of one choice's output as it is produced.

    `text` may be empty (a token still waiting for the rest of a UTF-8
    character, or held back as a possible stop-sequence prefix). The last
    delta of a choice carries `finish_reason`.
    """

    index: int
    text: str
    token_id: int | None = None
    logprob: float | None = None
    special: bool = False
    finish_reason: FinishReason | None = None
    top: tuple[TopToken, ...] = ()  # the most likely tokens at this step, when asked (SamplingParams.top_n)
    own: TokenText | None = None  # the token itself, when SamplingParams.logprobs
    echoed: bool = False  # a prompt token repeated by `echo` (its logprob None for the first)


@dataclass(frozen=True)
class TokenText:
    """One token as itself: its text (a replacement character where its bytes are only part of a
    UTF-8 character) and its exact bytes, which concatenated give the text back (None where an
    upstream does not say them: TGI's API has the token's text only)."""

    text: str
    raw: bytes | None


@dataclass(frozen=True)
class TopToken:
    """One of the most likely tokens at a step, by the model's own distribution."""

    token_id: int
    text: str
    logprob: float
    special: bool = False
    raw: bytes | None = None  # its exact bytes, when SamplingParams.logprobs (or an upstream sent them)


@dataclass
class Usage:
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0  # prompt tokens served from a prefix cache (the local engine's or an upstream's)

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens

    def add(self, other: Usage) -> None:
        self.prompt_tokens += other.prompt_tokens
        self.completion_tokens += other.completion_tokens
        self.cached_tokens += other.cached_tokens


@dataclass
class StreamEnd:
    """Closes a generation stream: the usage of the whole request."""

    usage: Usage


@dataclass(frozen=True)
class ToolCallDelta:
    """A piece of one tool call of choice `index`: the first piece of call `call` carries its id
    and name, the next ones fragments of its arguments (JSON text, concatenated in order)."""

    index: int
    call: int
    id: str | None = None
    name: str | None = None
    arguments: str = ""


# What a generation stream yields: token deltas (and tool-call deltas), then one StreamEnd.
GenerationEvent = TokenDelta | ToolCallDelta | StreamEnd


@dataclass
class Choice:
    index: int
    text: str
    finish_reason: FinishReason | None  # None: an upstream that did not say
    tokens: list[TokenDelta] = field(default_factory=list)
    tool_calls: list[ToolCall] = field(default_factory=list)


@dataclass
class GenerationResult:
    choices: list[Choice]
    usage: Usage


@dataclass(frozen=True)
class EmbeddingRequest:
    inputs: tuple[str, ...] | tuple[list[int], ...]
    normalize: bool | None = None  # None: what the model's configuration declares
    truncate: bool = True
    dimensions: int | None = None


@dataclass
class EmbeddingResult:
    vectors: list[list[float]]
    usage: Usage


@dataclass(frozen=True)
class TaskRequest:
    """A Hugging Face per-task call: `inputs` and `parameters` as the task defines them."""

    task: Task
    inputs: Any
    parameters: dict[str, Any] = field(default_factory=dict)

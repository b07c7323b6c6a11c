"""The one interface between the HTTP layer and compute.

A backend serves one configured model. Local (transformers/torch), upstream
(another server over HTTP) and fake backends all implement it, and routes only
ever talk to this interface. Everything here uses domain types only.
"""

from __future__ import annotations

import abc
import enum
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from gateway.backends.embedding_tasks import run_embedding_task
from gateway.domain import (
    EMBEDDING_TASKS,
    Choice,
    EmbeddingRequest,
    EmbeddingResult,
    GenerationEvent,
    GenerationRequest,
    GenerationResult,
    ModelState,
    StreamEnd,
    Task,
    TaskRequest,
    TokenDelta,
    ToolCall,
    ToolCallDelta,
    Usage,
)
from gateway.errors import TaskNotSupported, UnsupportedParameter

if TYPE_CHECKING:
    from gateway.metrics import Metrics


class Capability(str, enum.Enum):
    """What a backend can do, declared instead of found by probing its attributes."""

    GENERATE = "generate"  # generate_stream (and generate)
    EMBED = "embed"
    HF_TASKS = "hf_tasks"  # run_task beyond the embedding tasks
    PROMPT_LOGPROBS = "prompt_logprobs"  # TGI's prefill details
    LOGPROBS = "logprobs"  # OpenAI's logprobs (SamplingParams.logprobs): raw log-probabilities, bytes
    ECHO = "echo"  # OpenAI completions' echo (GenerationRequest.echo), logprobs of the prompt included
    WHOLE_RESPONSE = "whole_response"  # generate() is its own call (upstream), not the stream collected


@dataclass(frozen=True)
class QueueStats:
    """A local engine's load: requests waiting for the batch, and requests in it."""

    waiting: int
    running: int
    capacity: int | None = None  # the most that may wait; more are refused (queue saturation = waiting / capacity)
    prefix_blocks: tuple[int, int] | None = None  # the prefix cache's blocks: (held, most it may hold); None: no cache


@dataclass(frozen=True)
class MemoryUse:
    """What a loaded local model holds: on which device, and how many bytes (parameters, buffers and
    its KV cache's full reservation); `rss_delta` is the process's resident-size growth while it
    loaded, a cross-check (other allocations and the allocator's own caching make it differ)."""

    device: str  # "cpu" or "cuda:N": budgets are per device
    bytes: int
    rss_delta: int | None = None


@dataclass
class ModelInfo:
    """What /v1/models, /info and /ready report about a backend."""

    task: Task | None
    dtype: str | None = None
    device: str | None = None
    max_input_tokens: int | None = None
    max_total_tokens: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)


class Backend(abc.ABC):
    """Serves one model. Subclasses override the operations their task supports."""

    capabilities: frozenset[Capability] = frozenset()
    remote: bool = False  # answers from another server (routing prefers local deployments)
    total_timeout: float | None = None  # seconds from a request's arrival to its deadline, when bounded

    def __init__(self, name: str) -> None:
        self.name = name
        self.state = ModelState.PENDING
        self.error: str | None = None
        self.load_started: float | None = None
        self.load_seconds: float | None = None

    # lifecycle -------------------------------------------------------------
    async def start(self) -> None:
        """Load the model (or open connections). Sets `state` as it goes."""
        self.state = ModelState.LOADING
        self.load_started = time.monotonic()
        try:
            await self._load()
        except Exception as exc:  # a model that fails to load must not take the server down
            self.state = ModelState.FAILED
            self.error = f"{type(exc).__name__}: {exc}"
            raise
        self.load_seconds = time.monotonic() - self.load_started
        self.state = ModelState.READY

    @abc.abstractmethod
    async def _load(self) -> None: ...

    async def close(self) -> None:
        """Free resources; the backend is not used afterwards. Nothing to free by default."""
        return None

    @abc.abstractmethod
    def info(self) -> ModelInfo: ...

    def estimated_load_seconds(self) -> float | None:
        """Rough time left until READY, for `estimated_time` and Retry-After."""
        return None

    def queue_stats(self) -> QueueStats | None:
        """The engine's queue and batch, for backends that batch locally."""
        return None

    # memory (local models; others use none of the budget) -------------------------
    def memory_use(self) -> MemoryUse | None:
        """Measured once loaded; None for a backend that holds no model in this process."""
        return None

    def memory_estimate(self) -> MemoryUse | None:
        """What loading is expected to take, before it loads: for making room in the budget."""
        return None

    def attach_metrics(self, metrics: Metrics) -> None:
        """Take the app's metrics, for backends that record their own. Nothing by default."""
        return None

    async def probe(self) -> bool:
        """Whether the backend can serve again (the routing circuit breaker asks). By default: loaded."""
        return self.state == ModelState.READY

    # operations ------------------------------------------------------------
    async def generate(self, request: GenerationRequest) -> GenerationResult:
        return await collect(self.generate_stream(request), request.sampling.n)

    def generate_stream(self, request: GenerationRequest) -> AsyncIterator[GenerationEvent]:
        """Yields TokenDelta events and ends with one StreamEnd.

        Closing the iterator early (client gone) must stop the work.
        """
        raise TaskNotSupported(f"Model '{self.name}' does not generate text.")

    async def prompt_logprobs(self, request: GenerationRequest) -> list[TokenDelta]:
        """The prompt's tokens as the model reads them, each with its log-probability given
        the tokens before it (None for the first): TGI's `prefill` details."""
        raise UnsupportedParameter("decoder_input_details", f"is not supported by model '{self.name}'")

    async def embed(self, request: EmbeddingRequest) -> EmbeddingResult:
        raise TaskNotSupported(f"Model '{self.name}' does not compute embeddings.")

    async def run_task(self, request: TaskRequest) -> list[Any]:
        """A Hugging Face per-task call on a batch of inputs.

        `request.inputs` is a list of items (validated by the wire layer), all sharing
        `request.parameters`; returns one JSON-ready output per item, in order. The
        embedding tasks are served here from `embed`, for every backend that embeds.
        """
        if request.task in EMBEDDING_TASKS:
            return await run_embedding_task(self.embed, request)
        raise TaskNotSupported(f"Model '{self.name}' does not serve the task '{request.task.value}'.")


def refuse_unserved(backend: Backend, request: GenerationRequest) -> None:
    """Refuse, before generating, what a request asks and the backend cannot do (no silent drop)."""
    if request.sampling.logprobs and Capability.LOGPROBS not in backend.capabilities:
        raise UnsupportedParameter("logprobs", f"is not supported by model '{backend.name}'")
    if request.echo and Capability.ECHO not in backend.capabilities:
        raise UnsupportedParameter("echo", f"is not supported by model '{backend.name}'")


async def collect(events: AsyncIterator[GenerationEvent], n: int) -> GenerationResult:
    """Drain a generation stream into a whole result."""
    texts = [""] * n
    tokens: list[list[TokenDelta]] = [[] for _ in range(n)]
    finish: list[Any] = [None] * n
    calls: list[list[ToolCall]] = [[] for _ in range(n)]
    usage = Usage()
    async for event in events:
        if isinstance(event, StreamEnd):
            usage = event.usage
        elif isinstance(event, ToolCallDelta):
            found = calls[event.index]
            if event.call >= len(found):
                found.append(ToolCall(event.id or "", event.name or "", ""))
            call = found[event.call]
            found[event.call] = ToolCall(call.id, call.name, call.arguments + event.arguments)
        else:
            texts[event.index] += event.text
            tokens[event.index].append(event)
            if event.finish_reason is not None:
                finish[event.index] = event.finish_reason
    choices = [Choice(i, texts[i], finish[i], tokens[i], calls[i]) for i in range(n)]
    return GenerationResult(choices=choices, usage=usage)

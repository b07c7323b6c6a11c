"""The local backend: a model loaded in this process with transformers and torch.

What it serves depends on the kind of model its checkpoint holds, known once loaded: a
GenerativeModel (causal LM on the generation engine) or an EncoderModel (embeddings and the
other HF tasks). This class is the lifecycle around it: loading, load-time estimates, info.
"""

from __future__ import annotations

import functools
import threading
import time
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

from gateway.backends.base import Backend, Capability, MemoryUse, ModelInfo, QueueStats
from gateway.backends.local.args import local_args
from gateway.backends.local.encoder import EncoderModel
from gateway.backends.local.factory import LocalModel, load_local_model, read_checkpoint
from gateway.backends.local.generative import GenerativeModel
from gateway.backends.local.history import LoadHistory, checkpoint_bytes, history_key
from gateway.backends.local.memory import expected_device, give_back_memory, measure, rss_bytes
from gateway.backends.local.task import config_task
from gateway.config import ModelSpec, Settings
from gateway.domain import (
    EMBEDDING_TASKS,
    EmbeddingRequest,
    EmbeddingResult,
    GenerationEvent,
    GenerationRequest,
    ModelState,
    Task,
    TaskRequest,
    TokenDelta,
)
from gateway.engine import EngineObserver, NoObserver, in_fresh_thread
from gateway.metrics import Metrics

if TYPE_CHECKING:
    from gateway.engine import GenerationEngine, TextBound

# transformers' lazy imports and the weight-init patches it applies while loading are
# process-global: two models loading on two threads corrupt each other. One at a time.
_LOAD_LOCK = threading.Lock()
# What each checkpoint (loaded one way) measured last time: the estimate of its next load.
_MEASURED: dict[str, MemoryUse] = {}


def expected_capabilities(task: Task | None) -> frozenset[Capability]:
    """What a model of `task` will do, before it is loaded (nothing, while the task is unknown)."""
    if task is None:
        return frozenset()
    if task == Task.TEXT_GENERATION:
        return GenerativeModel.capabilities
    return frozenset({Capability.EMBED} if task in EMBEDDING_TASKS else {Capability.HF_TASKS})


class LocalBackend(Backend):
    def __init__(self, spec: ModelSpec, settings: Settings) -> None:
        super().__init__(spec.name)
        self.args = local_args(spec, settings)
        # Known before loading when possible: routes to a default model need its task.
        self.task: Task | None = spec.task or config_task(self.args.engine)
        self.capabilities = expected_capabilities(self.task)
        self._model: LocalModel | None = None
        self._history = LoadHistory(settings.cache_dir / "load-times.json")
        self._observer: EngineObserver = NoObserver()
        self._memory: MemoryUse | None = None

    def attach_metrics(self, metrics: Metrics) -> None:
        self._observer = metrics.engine_observer(self.name)
        if self._model is not None:
            self._model.observe(self._observer)

    # lifecycle -------------------------------------------------------------
    async def _load(self) -> None:
        model = await in_fresh_thread(self._load_sync)
        model.observe(self._observer)
        self._model, self.task, self.capabilities = model, model.task, model.capabilities

    def _load_sync(self) -> LocalModel:
        with _LOAD_LOCK:
            began = time.monotonic()  # not counting the wait for another model's load
            rss_before = rss_bytes()
            checkpoint = read_checkpoint(self.args, self.task)
            model = load_local_model(checkpoint, self.args, self._engine_failed)
            engine = model.engine if isinstance(model, GenerativeModel) else None
            self._memory = _MEASURED[self._memory_key] = measure(model.model, model.device, engine, rss_before)
        self._history.record(
            history_key(self.args.engine), time.monotonic() - began, checkpoint_bytes(self.args.engine)
        )
        return model

    @property
    def _memory_key(self) -> str:
        return f"{history_key(self.args.engine)} {self.args.engine.adapter} {self.args.engine.max_batch_size}"

    def memory_use(self) -> MemoryUse | None:
        return self._memory if self._model is not None else None

    def memory_estimate(self) -> MemoryUse | None:
        """The last measurement of this checkpoint, else its files' size (a guess: dtype and KV cache aside)."""
        known = _MEASURED.get(self._memory_key)
        if known is not None:
            return known
        device = expected_device(self.args.engine.device, self.args.engine.device_map)
        return MemoryUse(device, checkpoint_bytes(self.args.engine) or 0)

    def _engine_failed(self, why: str) -> None:
        """The engine's loop died (it failed its requests and refuses new ones): the model is
        failed, so /ready answers 503 naming it and requests get a 503 at once."""
        self.error = f"its generation engine stopped: {why}"
        self.state = ModelState.FAILED

    async def close(self) -> None:
        model, self._model = self._model, None
        if model is not None:
            await model.close()
            del model
            await in_fresh_thread(give_back_memory)

    def queue_stats(self) -> QueueStats | None:
        return QueueStats(waiting=0, running=0) if self._model is None else self._model.queue_stats()

    @functools.cached_property
    def _expected_load_seconds(self) -> float | None:
        # Asked on every 503 while the model loads (clients poll): the history file and the
        # checkpoint's size are read once, not per request on the event loop.
        return self._history.expected_seconds(history_key(self.args.engine), checkpoint_bytes(self.args.engine))

    def estimated_load_seconds(self) -> float | None:
        expected = self._expected_load_seconds
        if expected is None:
            return None
        elapsed = 0.0 if self.load_started is None else time.monotonic() - self.load_started
        return max(1.0, expected - elapsed)

    def info(self) -> ModelInfo:
        model, extra = self._model, {"source": self.args.engine.source}
        if model is None:
            return ModelInfo(task=self.task, extra=extra)
        return ModelInfo(
            task=self.task,
            dtype=str(model.dtype).removeprefix("torch."),
            device=str(model.device),
            max_input_tokens=model.prompt_limit(),
            max_total_tokens=model.context_length(),
            extra=extra,
        )

    # the generative model's parts, for tests and benchmarks that look inside ---------------
    @property
    def engine(self) -> GenerationEngine | None:
        return self._model.engine if isinstance(self._model, GenerativeModel) else None

    @property
    def tokenizer(self) -> Any:
        return None if self._model is None else self._model.tokenizer

    @property
    def vocab_rows(self) -> int:
        return self._model.vocab_rows if isinstance(self._model, GenerativeModel) else 0

    @property
    def text_bound(self) -> TextBound | None:
        return self._model.text_bound if isinstance(self._model, GenerativeModel) else None

    def _prompt_limit(self) -> int:
        assert self._model is not None, "loaded"
        return self._model.prompt_limit()

    # operations ------------------------------------------------------------
    def generate_stream(self, request: GenerationRequest) -> AsyncIterator[GenerationEvent]:
        if not isinstance(self._model, GenerativeModel):
            return super().generate_stream(request)  # refused at once, not on the first event
        return self._model.generate_stream(request)

    async def prompt_logprobs(self, request: GenerationRequest) -> list[TokenDelta]:
        if not isinstance(self._model, GenerativeModel):
            return await super().prompt_logprobs(request)
        return await self._model.prompt_logprobs(request)

    async def embed(self, request: EmbeddingRequest) -> EmbeddingResult:
        if not isinstance(self._model, EncoderModel):
            return await super().embed(request)
        return await self._model.embed(request)

    async def run_task(self, request: TaskRequest) -> list[Any]:
        if isinstance(self._model, EncoderModel) and self._model.handles(request.task):
            return await self._model.run_task(request)
        return await super().run_task(request)  # the embedding tasks refused by `embed`, or not served

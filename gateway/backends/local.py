"""The local backend: a model loaded in this process with transformers and torch."""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import math
import os
import threading
import time
from collections.abc import AsyncIterator
from concurrent.futures import Executor
from pathlib import Path
from typing import Any

from gateway.backends.base import Backend, GenerationEvent, ModelInfo, QueueStats
from gateway.config import LocalBackendSpec, ModelSpec, Settings
from gateway.domain import (
    EMBEDDING_TASKS,
    EmbeddingRequest,
    EmbeddingResult,
    GenerationRequest,
    ModelState,
    Task,
    TaskRequest,
    TokenDelta,
    Usage,
)
from gateway.engine import EngineArgs, EngineObserver, MicroBatcher, NoObserver, device_worker, in_fresh_thread
from gateway.errors import BackendFailure, GatewayError, InvalidRequest, TaskNotSupported
from gateway.metrics import Metrics

log = logging.getLogger(__name__)


# transformers' lazy imports and the weight-init patches it applies while loading are
# process-global: two models loading on two threads corrupt each other. One at a time.
_LOAD_LOCK = threading.Lock()


# Architecture-name suffix -> task, as transformers.pipeline picks a head for each task.
_HEAD_TASKS = (
    ("ForCausalLM", Task.TEXT_GENERATION),
    ("LMHeadModel", Task.TEXT_GENERATION),
    ("ForSequenceClassification", Task.TEXT_CLASSIFICATION),
    ("ForTokenClassification", Task.TOKEN_CLASSIFICATION),
    ("ForMaskedLM", Task.FILL_MASK),
    ("ForQuestionAnswering", Task.QUESTION_ANSWERING),
    ("ForImageClassification", Task.IMAGE_CLASSIFICATION),
)
_SEQ2SEQ_TASKS = (Task.TEXT2TEXT_GENERATION, Task.SUMMARIZATION, Task.TRANSLATION)


def infer_task(config: Any) -> Task:
    """The task a checkpoint's architecture implies, following pipeline()'s defaults.

    A sequence classifier with an 'entailment' label is an NLI model, which is what
    zero-shot classification runs on; an encoder-decoder is text2text-generation unless its
    `task_specific_params` name only summarization or only translation.
    """
    from gateway.engine import entailment_index

    archs = config.architectures or []
    arch = archs[0] if archs else ""
    for suffix, task in _HEAD_TASKS:
        if arch.endswith(suffix):
            if task == Task.TEXT_CLASSIFICATION and entailment_index(config) is not None:
                return Task.ZERO_SHOT_CLASSIFICATION
            return task
    if getattr(config, "is_encoder_decoder", False):
        declared = {key.split("_")[0] for key in (getattr(config, "task_specific_params", None) or {})}
        if declared == {"summarization"}:
            return Task.SUMMARIZATION
        if declared == {"translation"}:
            return Task.TRANSLATION
        return Task.TEXT2TEXT_GENERATION
    return Task.FEATURE_EXTRACTION


def config_task(spec: LocalBackendSpec) -> Task | None:
    """The task of a checkpoint whose config can be read now, without downloading, converting or
    running anything (a local folder, or a Hub id already cached); None leaves it to load time."""
    if spec.trust_remote_code:
        return None  # its config class is the checkpoint's own code: not run before the load
    from gateway.engine import resolve_source

    try:
        source = resolve_source(EngineArgs.of(spec))
        if source.gguf_file is not None:
            return None  # a GGUF has a config only once converted
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(source.path, revision=spec.revision, local_files_only=True)
    except Exception:  # missing, not cached, unknown architecture: the load says why
        return None
    return infer_task(config)


class LoadHistory:
    """How long each checkpoint took to load here, kept in the cache dir across restarts.

    It gives `estimated_time` while a model loads: its own last load time or, never loaded
    yet, its size at the load rate (bytes per second) measured on the other checkpoints.
    """

    _writing = threading.Lock()  # models finishing their loads together update one file

    def __init__(self, path: Path) -> None:
        self.path = path

    def _records(self) -> dict[str, dict[str, float]]:
        try:
            data = json.loads(self.path.read_text())
        except (OSError, ValueError):
            return {}
        if not isinstance(data, dict):
            return {}
        return {
            key: r for key, r in data.items()
            if isinstance(r, dict) and all(isinstance(r.get(f), (int, float)) for f in ("seconds", "bytes"))
        }

    def expected_seconds(self, key: str, size: int | None) -> float | None:
        records = self._records()
        if key in records:
            return float(records[key]["seconds"])
        measured = [r for r in records.values() if r["bytes"] > 0 and r["seconds"] > 0]
        if size and measured:
            rate = sum(r["bytes"] for r in measured) / sum(r["seconds"] for r in measured)
            return size / rate
        return None

    def record(self, key: str, seconds: float, size: int | None) -> None:
        with self._writing:
            records = self._records()
            records[key] = {"seconds": round(seconds, 3), "bytes": size or 0}
            tmp = self.path.with_name(f"{self.path.name}.tmp{os.getpid()}")
            try:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                tmp.write_text(json.dumps(records, indent=1))
                tmp.replace(self.path)  # atomic: another process never reads half a file
            except OSError as exc:
                log.warning("could not keep the load time of %s (%s)", key, exc)


def checkpoint_bytes(spec: LocalBackendSpec) -> int | None:
    """Size of a local checkpoint's files; None for a Hub id."""
    from gateway.engine import resolve_source

    try:
        source = resolve_source(EngineArgs.of(spec))
        if not source.is_local:
            return None
        root = Path(source.path)
        if source.gguf_file is not None:
            return (root / source.gguf_file).stat().st_size
        return sum(f.stat().st_size for f in root.rglob("*") if f.is_file())
    except OSError:
        return None


def model_class(task: Task) -> Any:
    """The transformers auto class whose head serves `task`."""
    import transformers as tf

    if task in _SEQ2SEQ_TASKS:
        return tf.AutoModelForSeq2SeqLM
    return {
        Task.TEXT_GENERATION: tf.AutoModelForCausalLM,
        Task.TEXT_CLASSIFICATION: tf.AutoModelForSequenceClassification,
        Task.ZERO_SHOT_CLASSIFICATION: tf.AutoModelForSequenceClassification,
        Task.TOKEN_CLASSIFICATION: tf.AutoModelForTokenClassification,
        Task.FILL_MASK: tf.AutoModelForMaskedLM,
        Task.QUESTION_ANSWERING: tf.AutoModelForQuestionAnswering,
        Task.IMAGE_CLASSIFICATION: tf.AutoModelForImageClassification,
    }.get(task, tf.AutoModel)


# Tasks a model loaded for one task can also serve (/pipeline/{task}/{model} forces a task).
_ALSO_SERVES = {
    Task.TEXT_CLASSIFICATION: {Task.ZERO_SHOT_CLASSIFICATION},
    Task.ZERO_SHOT_CLASSIFICATION: {Task.TEXT_CLASSIFICATION},
    **{t: set(_SEQ2SEQ_TASKS) for t in _SEQ2SEQ_TASKS},
}


class LocalBackend(Backend):
    def __init__(self, spec: ModelSpec, settings: Settings) -> None:
        super().__init__(spec.name)
        assert isinstance(spec.backend, LocalBackendSpec)
        self.spec = spec
        self.local: LocalBackendSpec = spec.backend
        self.args = EngineArgs.of(self.local)  # what the engine reads
        self.cache_dir = settings.cache_dir
        # Known before loading when possible: routes to a default model need its task.
        self.task: Task | None = spec.task or config_task(self.local)
        self._history = LoadHistory(settings.cache_dir / "load-times.json")
        self._history_key = f"{self.local.source}@{self.local.revision or ''} {self.local.device}/{self.local.dtype}"
        self.tokenizer: Any = None
        self.model: Any = None
        self.device: Any = None
        self.dtype: Any = None
        self.engine: Any = None  # GenerationEngine (continuous batching) for generative models
        self.vocab_rows = 0  # token IDs a generative model's embedding has rows for
        self.text_bound: Any = None  # the longest prompt text that can fit, if known (engine/prompt_limits.py)
        self.batcher: Any = None  # MicroBatcher for embeddings and the other HF tasks
        self.embedder: Any = None
        self.tasks: Any = None  # TaskModel for the other HF tasks
        self._executor: Executor | None = None  # the device's compute thread (engine/device.py)
        self._observer: EngineObserver = NoObserver()

    def attach_metrics(self, metrics: Metrics) -> None:
        self._observer = metrics.engine_observer(self.name)
        for engine in (self.engine, self.batcher):
            if engine is not None:
                engine.observer = self._observer

    # lifecycle -------------------------------------------------------------
    async def _load(self) -> None:
        await in_fresh_thread(self._load_sync)

    def _load_sync(self) -> None:
        with _LOAD_LOCK:
            began = time.monotonic()  # not counting the wait for another model's load
            self._load_locked()
        self._executor = device_worker(str(self.device))
        if self.task != Task.TEXT_GENERATION and self.task not in _SEQ2SEQ_TASKS:
            from gateway.engine import pack_linears

            pack_linears(self.model, self.local.max_batch_size)  # encoders: prepacked CPU matmuls
        if self.task == Task.TEXT_GENERATION:
            from gateway.engine import create_engine

            self.engine = create_engine(self.model, self.tokenizer, self.args, self.name, self._executor)
            self.engine.observer = self._observer
            from gateway.engine import text_bound

            self.vocab_rows = int(self.model.get_input_embeddings().weight.shape[0])
            self.text_bound = text_bound(self.tokenizer)
            self.engine.on_failure = self._engine_failed
        else:
            # Embeddings and the other encoder tasks: concurrent requests share forward passes.
            self.batcher = MicroBatcher(
                self.name,
                self._executor,
                max_batch_size=self.local.max_batch_size,
                max_wait_ms=self.local.max_wait_ms,
                max_queue=self.local.max_queue,
            )
            self.batcher.observer = self._observer
        self._history.record(self._history_key, time.monotonic() - began, checkpoint_bytes(self.local))

    def _load_locked(self) -> None:
        from transformers import AutoConfig, AutoModelForCausalLM

        from gateway.engine import checkpoint_path, load_model

        if self.task is None:
            path, kwargs = checkpoint_path(self.args, self.cache_dir, AutoModelForCausalLM)
            self.task = infer_task(AutoConfig.from_pretrained(path, **kwargs))
        auto_cls = model_class(self.task)
        if self.task == Task.TEXT_GENERATION:
            self.tokenizer, self.model, self.device, self.dtype = load_model(self.args, self.cache_dir, auto_cls)
        elif self.task in EMBEDDING_TASKS:
            from gateway.engine import Embedder, read_pooling_config

            self.tokenizer, self.model, self.device, self.dtype = load_model(self.args, self.cache_dir, auto_cls)
            path, _ = checkpoint_path(self.args, self.cache_dir, auto_cls)
            pooling = read_pooling_config(path, self.local.pooling, self.local.normalize)
            self.embedder = Embedder(self.model, self.tokenizer, self.device, pooling, self.local.max_input_tokens)
        else:
            from gateway.engine import TaskModel

            image = self.task == Task.IMAGE_CLASSIFICATION
            if image:
                from transformers import AutoImageProcessor
            preprocessor, self.model, self.device, self.dtype = load_model(
                self.args, self.cache_dir, auto_cls, AutoImageProcessor if image else None
            )
            self.tokenizer = None if image else preprocessor
            self.tasks = TaskModel(
                self.model, self.tokenizer, self.device, image_processor=preprocessor if image else None
            )

    def _engine_failed(self, why: str) -> None:
        """The engine's loop died (it failed its requests and refuses new ones): the model is
        failed, so /ready answers 503 naming it and requests get a 503 at once."""
        self.error = f"its generation engine stopped: {why}"
        self.state = ModelState.FAILED

    async def close(self) -> None:
        if self.engine is not None:
            await asyncio.get_running_loop().run_in_executor(None, self.engine.close)
        if self.batcher is not None:
            await self.batcher.close()

    def queue_stats(self) -> QueueStats | None:
        engine = self.engine or self.batcher
        if engine is None:
            return QueueStats(waiting=0, running=0)
        return QueueStats(waiting=engine.queue_depth(), running=engine.running)

    @functools.cached_property
    def _expected_load_seconds(self) -> float | None:
        # Asked on every 503 while the model loads (clients poll): the history file and the
        # checkpoint's size are read once, not per request on the event loop.
        return self._history.expected_seconds(self._history_key, checkpoint_bytes(self.local))

    def estimated_load_seconds(self) -> float | None:
        expected = self._expected_load_seconds
        if expected is None:
            return None
        elapsed = 0.0 if self.load_started is None else time.monotonic() - self.load_started
        return max(1.0, expected - elapsed)

    def context_length(self) -> int:
        """Longest sequence served: the engine's slot length for generation, the embedder's input limit
        (the one enforced) for an embedding model, else the model's context."""
        if self.engine is not None:
            return int(self.engine.max_len)
        if self.task in EMBEDDING_TASKS and self.embedder is not None:
            return int(self.embedder.max_length)
        from gateway.engine import context_length

        return (context_length(self.model.config) if self.model is not None else None) or 2048

    def info(self) -> ModelInfo:
        loaded = self.model is not None
        max_total = self.context_length() if loaded else None
        return ModelInfo(
            task=self.task,
            dtype=str(self.dtype).removeprefix("torch.") if loaded else None,
            device=str(self.device) if loaded else None,
            max_input_tokens=self._max_input_tokens(max_total),
            max_total_tokens=max_total,
            extra={"source": self.local.source},
        )

    def _max_input_tokens(self, max_total: int | None) -> int | None:
        if max_total is None:
            return None
        if self.engine is None:  # nothing is generated after the input: it may fill the context
            return min(max_total, self.local.max_input_tokens or max_total)
        return self.local.max_input_tokens or max_total - 1

    # generation ------------------------------------------------------------
    def _prompt_limit(self) -> int:
        return self.local.max_input_tokens or self.context_length() - 1

    def _refuse_long_text(self, text: str, request: GenerationRequest, param: str) -> None:
        """Refuse, before tokenizing, a text too long for any tokenization of it to fit."""
        if self.text_bound is None or request.truncate:
            return  # no bound for this tokenizer; or TGI's `truncate` keeps the end of any prompt
        limit = self._prompt_limit()
        size = self.text_bound.too_long(text, limit)
        if size is not None:
            raise InvalidRequest(
                f"The prompt has {size} characters: more than the {limit} tokens this model accepts, "
                f"whatever the text (no token of its vocabulary spans over {self.text_bound.chars_per_token}).",
                param=param,
            )

    def _known_ids(self, ids: list[int]) -> list[int]:
        """Token IDs given as the prompt, each checked against the vocabulary: one out of range would
        fail the embedding lookup of the whole batch, every neighbour's stream with it."""
        rows = self.vocab_rows
        if not ids or (0 <= min(ids) and max(ids) < rows):
            return ids
        for position, token in enumerate(ids):
            if not 0 <= token < rows:
                raise InvalidRequest(
                    f"Token ID {token} at position {position} of the prompt is outside this model's "
                    f"vocabulary (IDs 0 to {rows - 1}).",
                    param="prompt",
                )
        return ids

    def _prompt_ids(self, request: GenerationRequest) -> list[int]:
        tok = self.tokenizer
        if request.messages is not None:
            if not tok.chat_template:
                raise InvalidRequest(
                    f"Model '{self.name}' has no chat template; use /v1/completions with a plain prompt.",
                    param="messages",
                )
            text = tok.apply_chat_template(
                [{"role": m.role, "content": m.content} for m in request.messages],
                add_generation_prompt=True,
                tokenize=False,
            )
            self._refuse_long_text(text, request, "messages")  # rendering is cheap, tokenizing is not
            return list(tok(text, add_special_tokens=False)["input_ids"])
        if isinstance(request.prompt, list):
            return self._known_ids(list(request.prompt))
        self._refuse_long_text(request.prompt or "", request, "prompt")
        return list(tok(request.prompt or "")["input_ids"])

    def _budget(self, prompt_ids: list[int], asked: int | None) -> int:
        context = self.context_length()
        limit = self._prompt_limit()
        if not prompt_ids:
            raise InvalidRequest("The prompt is empty.", param="prompt")
        if len(prompt_ids) > limit:
            raise InvalidRequest(
                f"The prompt has {len(prompt_ids)} tokens; this model accepts at most {limit}.", param="messages"
            )
        room = context - len(prompt_ids)
        if asked is None:
            return min(self.local.default_max_tokens, room)
        if asked > room:
            raise InvalidRequest(
                f"max_tokens={asked} plus the prompt's {len(prompt_ids)} tokens exceed the model's "
                f"context of {context} tokens.",
                param="max_tokens",
            )
        return asked

    def _validated_prompt(self, request: GenerationRequest) -> tuple[list[int], int]:
        prompt_ids = self._prompt_ids(request)
        if request.truncate:
            prompt_ids = prompt_ids[-request.truncate :]
        return prompt_ids, self._budget(prompt_ids, request.sampling.max_tokens)

    def generate_stream(self, request: GenerationRequest) -> AsyncIterator[GenerationEvent]:
        if self.engine is None:
            raise TaskNotSupported(f"Model '{self.name}' does not generate text.")
        return self._generate(request)

    async def _generate(self, request: GenerationRequest) -> AsyncIterator[GenerationEvent]:
        # Templating and tokenising a long prompt takes milliseconds: not on the event loop.
        prompt_ids, max_tokens = await asyncio.get_running_loop().run_in_executor(
            None, self._validated_prompt, request
        )
        async for event in self.engine.stream(
            prompt_ids, request.sampling, max_tokens, request.keep_stop, request_id=request.request_id
        ):
            yield event

    async def prompt_logprobs(self, request: GenerationRequest) -> list[TokenDelta]:
        if self.engine is None:
            return await super().prompt_logprobs(request)
        ids = self._prompt_ids(request)
        if request.truncate:
            ids = ids[-request.truncate :]
        self._budget(ids, 1)
        scores = await self.engine.score(ids)
        special = set(self.tokenizer.all_special_ids)
        return [
            TokenDelta(0, self.tokenizer.decode([token]), token, None if i == 0 else scores[i - 1], token in special)
            for i, token in enumerate(ids)
        ]

    # Hugging Face tasks ----------------------------------------------------
    def serves(self, task: Task) -> bool:
        if task == self.task or task in _ALSO_SERVES.get(self.task, ()):  # type: ignore[arg-type]
            return True
        return task in EMBEDDING_TASKS and self._text_encoder() is not None

    def _text_encoder(self) -> Any:
        """The model's own encoder for embeddings of a model loaded for another task (/pipeline/feature-extraction)."""
        if self.embedder is not None:
            return self.embedder
        if self.tasks is None or self.tokenizer is None or getattr(self.model.config, "is_encoder_decoder", False):
            return None  # only encoders loaded for an HF task lend their encoder
        from gateway.engine import Embedder, PoolingConfig

        self.embedder = Embedder(self.model.base_model, self.tokenizer, self.device, PoolingConfig(mode="mean"))
        return self.embedder

    async def run_task(self, request: TaskRequest) -> list[Any]:
        if request.task in EMBEDDING_TASKS and self.serves(request.task):
            return await super().run_task(request)
        from gateway.engine import runner

        run = runner(request.task)
        if run is None or self.tasks is None or not self.serves(request.task):
            return await super().run_task(request)
        params = request.parameters
        key = (request.task, json.dumps(params, sort_keys=True, default=str))
        try:
            return await self.batcher.run(key, list(request.inputs), lambda items: run(self.tasks, items, params))
        except GatewayError:
            raise
        except Exception as exc:  # logged here; the client gets a clean 500 in its API's shape
            log.exception("%s failed in %s", request.task.value, self.name)
            raise BackendFailure(f"The {request.task.value} computation failed ({type(exc).__name__}).") from exc

    # embeddings ------------------------------------------------------------
    async def embed(self, request: EmbeddingRequest) -> EmbeddingResult:
        if self._text_encoder() is None:
            raise TaskNotSupported(f"Model '{self.name}' does not compute embeddings.")
        embedder = self.embedder
        if request.dimensions is not None and request.dimensions > embedder.dimensions:
            raise InvalidRequest(
                f"dimensions={request.dimensions} exceeds the model's {embedder.dimensions}.", param="dimensions"
            )
        # Token IDs are embedded as given (not decoded and tokenised again): checked here, before they
        # share a batch with other requests.
        embedder.check_ids(request.inputs)
        normalize, truncate = request.normalize, request.truncate
        rows = await self.batcher.run(
            ("embed", normalize, truncate),
            list(request.inputs),
            lambda items: embedder.encode_rows(items, normalize, truncate),
        )
        vectors = [vector for vector, _ in rows]
        if request.dimensions is not None:
            vectors = [_shortened(vector, request.dimensions) for vector in vectors]
        return EmbeddingResult(vectors=vectors, usage=Usage(prompt_tokens=sum(tokens for _, tokens in rows)))


def _shortened(vector: list[float], dimensions: int) -> list[float]:
    """The first `dimensions` components, L2-normalised again (Matryoshka-style truncation)."""
    head = vector[:dimensions]
    norm = math.sqrt(sum(v * v for v in head)) or 1.0
    return [v / norm for v in head]


"""An encoder (or encoder-decoder) for embeddings and the other HF tasks, behind a micro-batcher:
concurrent requests share forward passes."""

from __future__ import annotations

import json
import logging
import math
from typing import TYPE_CHECKING, Any

from gateway.backends.base import Capability, QueueStats
from gateway.backends.embedding_tasks import run_embedding_task
from gateway.backends.local.args import LocalArgs
from gateway.backends.local.task import ALSO_SERVES
from gateway.domain import EMBEDDING_TASKS, EmbeddingRequest, EmbeddingResult, Task, TaskRequest, Usage
from gateway.engine import EngineObserver, MicroBatcher
from gateway.errors import BackendFailure, GatewayError, InvalidRequest, TaskNotSupported

if TYPE_CHECKING:
    import torch

    from gateway.engine import Embedder, TaskModel

log = logging.getLogger(__name__)


class EncoderModel:
    """Loaded for embeddings (an `embedder`) or for another HF task (its `tasks`). A text encoder
    loaded for a task also lends its encoder for embeddings (/pipeline/feature-extraction/{model})."""

    def __init__(
        self,
        args: LocalArgs,
        task: Task,
        model: Any,
        tokenizer: Any,  # None for image models
        device: torch.device,
        dtype: torch.dtype,
        batcher: MicroBatcher,
        serving: Embedder | TaskModel,
    ) -> None:
        from gateway.engine import Embedder

        self.name = args.name
        self.args = args
        self.task = task
        self.model = model
        self.tokenizer = tokenizer
        self.device = device
        self.dtype = dtype
        self.batcher = batcher
        self.embedder: Embedder | None = serving if isinstance(serving, Embedder) else None
        self.tasks: TaskModel | None = None if isinstance(serving, Embedder) else serving
        # only encoders loaded for an HF task lend their encoder (an encoder-decoder has no one vector)
        encoder_only = not getattr(model.config, "is_encoder_decoder", False)
        self._lends = self.tasks is not None and tokenizer is not None and encoder_only
        if self.tasks is None:
            self.capabilities = frozenset({Capability.EMBED})
        else:
            self.capabilities = frozenset(
                {Capability.HF_TASKS, Capability.EMBED} if self._lends else {Capability.HF_TASKS}
            )

    def observe(self, observer: EngineObserver) -> None:
        self.batcher.observer = observer

    def context_length(self) -> int:
        """Longest input: the embedder's limit (the one enforced) for an embedding model, else the model's context."""
        if self.task in EMBEDDING_TASKS and self.embedder is not None:
            return int(self.embedder.max_length)
        from gateway.engine import context_length

        return context_length(self.model.config) or 2048

    def prompt_limit(self) -> int:
        """Nothing is generated after the input: it may fill the context."""
        total = self.context_length()
        return min(total, self.args.max_input_tokens or total)

    def queue_stats(self) -> QueueStats:
        return QueueStats(
            waiting=self.batcher.queue_depth(), running=self.batcher.running, capacity=self.batcher.max_queue
        )

    async def close(self) -> None:
        await self.batcher.close()

    # Hugging Face tasks ----------------------------------------------------
    def serves(self, task: Task) -> bool:
        if task == self.task or task in ALSO_SERVES.get(self.task, ()):
            return True
        return task in EMBEDDING_TASKS and self.text_encoder() is not None

    def handles(self, task: Task) -> bool:
        """Whether `run_task` computes `task` here."""
        from gateway.engine import runner

        return self.serves(task) and (task in EMBEDDING_TASKS or (self.tasks is not None and runner(task) is not None))

    def text_encoder(self) -> Embedder | None:
        """The embedder: the model's own, or the encoder of a model loaded for another task."""
        if self.embedder is None and self._lends:
            from gateway.engine import Embedder, PoolingConfig

            pooling = PoolingConfig(mode="mean")
            self.embedder = Embedder(
                self.model.base_model, self.tokenizer, self.device, pooling, self.args.max_input_tokens
            )
        return self.embedder

    async def run_task(self, request: TaskRequest) -> list[Any]:
        """A task this model `handles`."""
        if request.task in EMBEDDING_TASKS:
            return await run_embedding_task(self.embed, request)
        from gateway.engine import runner

        run, tasks, params = runner(request.task), self.tasks, request.parameters
        assert run is not None and tasks is not None, "run_task is for the tasks the model handles"
        key = (request.task, json.dumps(params, sort_keys=True, default=str))
        try:
            return await self.batcher.run(key, list(request.inputs), lambda items: run(tasks, items, params))
        except GatewayError:
            raise
        except Exception as exc:  # logged here; the client gets a clean 500 in its API's shape
            log.exception("%s failed in %s", request.task.value, self.name)
            raise BackendFailure(f"The {request.task.value} computation failed ({type(exc).__name__}).") from exc

    # embeddings ------------------------------------------------------------
    async def embed(self, request: EmbeddingRequest) -> EmbeddingResult:
        embedder = self.text_encoder()
        if embedder is None:
            raise TaskNotSupported(f"Model '{self.name}' does not compute embeddings.")
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

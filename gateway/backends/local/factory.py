"""Loading a local model: its checkpoint read for its task, then the serving model for that kind of task."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from gateway.backends.local.args import LocalArgs
from gateway.backends.local.encoder import EncoderModel
from gateway.backends.local.generative import GenerativeModel
from gateway.backends.local.task import SEQ2SEQ_TASKS, infer_task, model_class
from gateway.domain import EMBEDDING_TASKS, Task
from gateway.engine import MicroBatcher, device_worker

if TYPE_CHECKING:
    import torch

    from gateway.engine import PoolingConfig

LocalModel = GenerativeModel | EncoderModel


@dataclass(frozen=True)
class Checkpoint:
    """Weights and preprocessor in memory, not yet serving."""

    task: Task
    model: Any
    preprocessor: Any  # the tokenizer; the image processor for image tasks
    device: torch.device
    dtype: torch.dtype
    pooling: PoolingConfig | None  # embedding models: how token vectors become one


def read_checkpoint(args: LocalArgs, task: Task | None) -> Checkpoint:
    """Load the weights with the head `task` needs (read from the checkpoint's config when None).

    transformers' loading is process-global: the caller holds the load lock around this."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from gateway.engine import checkpoint_path, load_model

    engine, cache = args.engine, args.cache_dir
    if task is None:
        path, kwargs = checkpoint_path(engine, cache, AutoModelForCausalLM)
        task = infer_task(AutoConfig.from_pretrained(path, **kwargs))
    auto_cls = model_class(task)
    if task == Task.IMAGE_CLASSIFICATION:
        from transformers import AutoImageProcessor

        preprocessor, model, device, dtype = load_model(engine, cache, auto_cls, AutoImageProcessor, generative=False)
    else:
        generative = task == Task.TEXT_GENERATION
        preprocessor, model, device, dtype = load_model(engine, cache, auto_cls, generative=generative)
    pooling = None
    if task in EMBEDDING_TASKS:
        from gateway.engine import read_pooling_config

        path, _ = checkpoint_path(engine, cache, auto_cls)
        pooling = read_pooling_config(path, engine.pooling, engine.normalize)
    return Checkpoint(task, model, preprocessor, device, dtype, pooling)


def load_local_model(checkpoint: Checkpoint, args: LocalArgs, on_failure: Callable[[str], None]) -> LocalModel:
    """The serving model for the checkpoint's task, computing on its device's thread. A generative
    model's engine calls `on_failure` if its loop dies."""
    executor = device_worker(str(checkpoint.device))
    model, device, dtype = checkpoint.model, checkpoint.device, checkpoint.dtype
    if checkpoint.task == Task.TEXT_GENERATION:
        from gateway.engine import create_engine

        tokenizer = checkpoint.preprocessor
        engine = create_engine(model, tokenizer, args.engine, args.name, executor)
        return GenerativeModel(args, tokenizer, model, device, dtype, engine, on_failure)
    if checkpoint.task not in SEQ2SEQ_TASKS:
        from gateway.engine import pack_linears

        pack_linears(model, args.engine.max_batch_size)  # encoders: prepacked CPU matmuls
    # Embeddings and the other encoder tasks: concurrent requests share forward passes.
    engine_args = args.engine
    batcher = MicroBatcher(
        args.name,
        executor,
        max_batch_size=engine_args.max_batch_size,
        max_wait_ms=engine_args.max_wait_ms,
        max_queue=engine_args.max_queue,
    )
    image = checkpoint.task == Task.IMAGE_CLASSIFICATION
    tokenizer = None if image else checkpoint.preprocessor
    if checkpoint.pooling is not None:
        from gateway.engine import Embedder

        embedder = Embedder(model, tokenizer, device, checkpoint.pooling, args.max_input_tokens)
        return EncoderModel(args, checkpoint.task, model, tokenizer, device, dtype, batcher, embedder)
    from gateway.engine import TaskModel

    tasks = TaskModel(model, tokenizer, device, image_processor=checkpoint.preprocessor if image else None)
    return EncoderModel(args, checkpoint.task, model, tokenizer, device, dtype, batcher, tasks)

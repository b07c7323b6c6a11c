"""Hugging Face task pipelines for the local backend, one small module per task family.

Every task is a batch function `run(model, items, params) -> list`: `items` are the
inputs of one request (already validated by the wire layer), `params` their shared,
validated parameters, and the result has one JSON-ready output per item, in order.
They run on a compute thread; a batcher can call them with any number of items.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from gateway.domain import Task
from gateway.errors import InvalidRequest


@dataclass
class TaskModel:
    """What a task function needs from a loaded checkpoint."""

    model: Any
    tokenizer: Any  # None for image models
    device: torch.device
    image_processor: Any = None
    _pipelines: dict[str, Any] = field(default_factory=dict)

    @property
    def max_length(self) -> int:
        """Longest input in tokens: the tokenizer's limit, capped by the model's positions."""
        limits = [getattr(self.model.config, "max_position_embeddings", None)]
        if self.tokenizer is not None and self.tokenizer.model_max_length < 1_000_000:
            limits.append(self.tokenizer.model_max_length)
        known = [n for n in limits if isinstance(n, int) and n > 0]
        return min(known) if known else 512

    def check_length(self, items: list[str], param: str = "inputs") -> None:
        """Refuse inputs the model cannot read whole (the pipelines would fail on them)."""
        lengths = [len(ids) for ids in self.tokenizer(list(items))["input_ids"]]
        for number, n in enumerate(lengths):
            if n > self.max_length:
                raise InvalidRequest(
                    f"Input {number} has {n} tokens; this model reads at most {self.max_length}.", param=param
                )

    def batch_size(self, forwards: int) -> int:
        """Pipeline batch size that runs `forwards` model inputs in one pass (padding needs a pad token)."""
        if self.tokenizer is not None and self.tokenizer.pad_token_id is None:
            return 1
        return max(1, forwards)

    def pipeline(self, task: str) -> Any:
        """A `transformers.pipeline` over the already-loaded model, built once per task."""
        if task not in self._pipelines:
            from transformers import pipeline

            # `task` is a runtime string; the stubs only type the per-literal overloads
            self._pipelines[task] = pipeline(task, model=self.model, tokenizer=self.tokenizer, device=self.device)  # type: ignore[call-overload]
        return self._pipelines[task]


TaskFunction = Callable[[TaskModel, list[Any], dict[str, Any]], list[Any]]


def runner(task: Task) -> TaskFunction | None:
    """The batch function serving `task`, or None when no module here serves it."""
    from gateway.engine.encoders.tasks import (
        classification,
        fill_mask,
        question_answering,
        seq2seq,
        token_classification,
    )

    table: dict[Task, TaskFunction] = {
        Task.TEXT_CLASSIFICATION: classification.run_text,
        Task.ZERO_SHOT_CLASSIFICATION: classification.run_zero_shot,
        Task.IMAGE_CLASSIFICATION: classification.run_image,
        Task.TOKEN_CLASSIFICATION: token_classification.run,
        Task.FILL_MASK: fill_mask.run,
        Task.QUESTION_ANSWERING: question_answering.run,
        Task.SUMMARIZATION: seq2seq.run_summarization,
        Task.TRANSLATION: seq2seq.run_translation,
        Task.TEXT2TEXT_GENERATION: seq2seq.run_text2text,
    }
    return table.get(task)

"""The Hugging Face embedding tasks, served from any backend's `embed`.

feature-extraction is the embeddings themselves; sentence-similarity is the cosine of a source
sentence with each of the others (dot products of unit vectors). Every backend that embeds
answers both through `Backend.run_task`, so a routed model does too, deployment by deployment.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from gateway.domain import EmbeddingRequest, EmbeddingResult, Task, TaskRequest

Embed = Callable[[EmbeddingRequest], Awaitable[EmbeddingResult]]


async def run_embedding_task(embed: Embed, request: TaskRequest) -> list[Any]:
    """One output per item of `request` (an embedding task: see domain.EMBEDDING_TASKS), in order."""
    if request.task == Task.SENTENCE_SIMILARITY:
        return [await _similarities(embed, item) for item in request.inputs]
    assert request.task == Task.FEATURE_EXTRACTION, request.task
    result = await embed(
        EmbeddingRequest(
            inputs=tuple(request.inputs),
            normalize=request.parameters.get("normalize"),
            truncate=request.parameters.get("truncate", True),
            dimensions=request.parameters.get("dimensions"),
        )
    )
    return result.vectors


async def _similarities(embed: Embed, item: dict[str, Any]) -> list[float]:
    texts = (item["source_sentence"], *item["sentences"])
    result = await embed(EmbeddingRequest(inputs=texts, normalize=True))
    source, *others = result.vectors
    return [sum(a * b for a, b in zip(source, other, strict=True)) for other in others]

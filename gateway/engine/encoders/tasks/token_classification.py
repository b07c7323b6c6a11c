"""Token classification (NER) with every aggregation strategy of the transformers pipeline."""

from __future__ import annotations

from typing import Any

from gateway.engine.encoders.tasks import TaskModel
from gateway.errors import InvalidRequest


def _plain(entity: dict[str, Any]) -> dict[str, Any]:
    """numpy scalars -> Python numbers, so the result serialises as JSON."""
    out = {}
    for key, value in entity.items():
        if hasattr(value, "item"):
            value = value.item()
        out[key] = value
    return out


def run(tm: TaskModel, items: list[str], params: dict[str, Any]) -> list[list[dict]]:
    """A list of entities per text: `entity_group` (or `entity` with no aggregation), score, word, start, end."""
    stride = params.get("stride")
    if not stride:
        tm.check_length(items)  # with a stride, long texts are read in overlapping windows
    elif stride >= tm.max_length - 2:
        raise InvalidRequest(f"stride must be smaller than the model's {tm.max_length - 2} tokens.", param="stride")
    pipe = tm.pipeline("token-classification")
    kwargs: dict[str, Any] = {"aggregation_strategy": params.get("aggregation_strategy", "simple")}
    if params.get("ignore_labels") is not None:
        kwargs["ignore_labels"] = params["ignore_labels"]
    if params.get("stride"):
        kwargs["stride"] = params["stride"]
    outputs = pipe(list(items), batch_size=tm.batch_size(len(items)), **kwargs)
    return [[_plain(entity) for entity in entities] for entities in outputs]

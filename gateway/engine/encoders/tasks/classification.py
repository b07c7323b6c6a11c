"""Sequence classification (text and image) and NLI-based zero-shot classification."""

from __future__ import annotations

import io
from typing import Any

import torch

from gateway.engine.encoders.tasks import TaskModel
from gateway.errors import InvalidRequest


def _function(model: Any, asked: str | None) -> str:
    if asked:
        return asked
    config = model.config
    if config.problem_type == "multi_label_classification" or config.num_labels == 1:
        return "sigmoid"
    return "softmax"


def _ranked(model: Any, logits: torch.Tensor, params: dict[str, Any], default_top_k: int | None) -> list[list[dict]]:
    function = _function(model, params.get("function_to_apply"))
    logits = logits.float().cpu()
    if function == "softmax":
        scores = torch.softmax(logits, dim=-1)
    elif function == "sigmoid":
        scores = torch.sigmoid(logits)
    else:
        scores = logits
    top_k = params.get("top_k", default_top_k) or scores.shape[-1]
    labels = model.config.id2label
    results = []
    for row in scores:
        order = torch.argsort(row, descending=True)[:top_k]
        results.append([{"label": labels[int(i)], "score": float(row[i])} for i in order])
    return results


@torch.inference_mode()
def run_text(tm: TaskModel, items: list[str], params: dict[str, Any]) -> list[list[dict]]:
    """One list of {label, score} per text, best first (all labels unless `top_k`)."""
    batch = tm.tokenizer(items, padding=True, truncation=True, max_length=tm.max_length, return_tensors="pt").to(
        tm.device
    )
    return _ranked(tm.model, tm.model(**batch).logits, params, None)


@torch.inference_mode()
def run_image(tm: TaskModel, items: list[bytes], params: dict[str, Any]) -> list[list[dict]]:
    """One list of {label, score} per image, best first (5 unless `top_k`, as the pipeline does)."""
    from PIL import Image, UnidentifiedImageError

    images = []
    for number, data in enumerate(items):
        try:
            images.append(Image.open(io.BytesIO(data)).convert("RGB"))
        except (UnidentifiedImageError, OSError, Image.DecompressionBombError) as exc:
            raise InvalidRequest(
                f"Input {number} is not an image this server can read: {exc}.", param="inputs"
            ) from exc
    batch = tm.image_processor(images=images, return_tensors="pt").to(tm.device)
    batch = {k: v.to(tm.model.dtype) if v.is_floating_point() else v for k, v in batch.items()}
    return _ranked(tm.model, tm.model(**batch).logits, params, 5)


def entailment_index(config: Any) -> int | None:
    """The NLI label meaning 'entailment', which zero-shot classification scores."""
    for index, label in config.id2label.items():
        if str(label).lower().startswith("entail"):
            return int(index)
    return None


def run_zero_shot(tm: TaskModel, items: list[str], params: dict[str, Any]) -> list[list[dict]]:
    """A flat list of {label, score} per text, best first; scores sum to 1 unless multi_label."""
    if entailment_index(tm.model.config) is None:
        raise InvalidRequest(
            "This model has no 'entailment' label, so it cannot do zero-shot classification.", param="model"
        )
    tm.check_length(items)
    pipe = tm.pipeline("zero-shot-classification")
    kwargs: dict[str, Any] = {
        "candidate_labels": params["candidate_labels"],
        "multi_label": params.get("multi_label", False),
    }
    if params.get("hypothesis_template"):
        kwargs["hypothesis_template"] = params["hypothesis_template"]
    outputs = pipe(list(items), batch_size=tm.batch_size(len(items) * len(kwargs["candidate_labels"])), **kwargs)
    if isinstance(outputs, dict):
        outputs = [outputs]
    return [
        [{"label": label, "score": float(score)} for label, score in zip(out["labels"], out["scores"], strict=True)]
        for out in outputs
    ]

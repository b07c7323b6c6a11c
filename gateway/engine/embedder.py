"""Sentence embeddings with the pooling a sentence-transformers checkpoint declares."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import torch

from gateway.errors import InvalidRequest

_POOLING_KEYS = {
    "pooling_mode_cls_token": "cls",
    "pooling_mode_mean_tokens": "mean",
    "pooling_mode_max_tokens": "max",
    "pooling_mode_lasttoken": "last",
}


@dataclass(frozen=True)
class PoolingConfig:
    mode: str = "mean"
    normalize: bool = False
    max_seq_length: int | None = None


def _read_json(path: str, filename: str) -> Any:
    from transformers.utils import cached_file

    try:
        found = cached_file(path, filename, _raise_exceptions_for_missing_entries=False)
    except OSError:
        return None
    if not found:
        return None
    with open(found) as f:
        return json.load(f)


def read_pooling_config(path: str, pooling: str, normalize: bool | None) -> PoolingConfig:
    """Pooling and normalisation from modules.json / 1_Pooling, overridable by the spec."""
    modules = _read_json(path, "modules.json") or []
    declared_mode, declared_norm = "mean", False
    for module in modules:
        kind = module.get("type", "")
        if kind.endswith("Pooling"):
            cfg = _read_json(path, f"{module.get('path', '1_Pooling')}/config.json") or {}
            declared_mode = next((mode for key, mode in _POOLING_KEYS.items() if cfg.get(key)), "mean")
        elif kind.endswith("Normalize"):
            declared_norm = True
    st_config = _read_json(path, "sentence_bert_config.json") or {}
    return PoolingConfig(
        mode=declared_mode if pooling == "auto" else pooling,
        normalize=declared_norm if normalize is None else normalize,
        max_seq_length=st_config.get("max_seq_length"),
    )


class Embedder:
    def __init__(self, model: Any, tokenizer: Any, device: torch.device, pooling: PoolingConfig) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.device = device
        self.pooling = pooling
        limits = [
            pooling.max_seq_length,
            getattr(model.config, "max_position_embeddings", None),
            tokenizer.model_max_length if tokenizer.model_max_length < 1_000_000 else None,
        ]
        self.max_length = min(x for x in limits if x) if any(limits) else 512
        self.dimensions = int(model.config.hidden_size)

    def count_tokens(self, texts: list[str]) -> list[int]:
        return [len(ids) for ids in self.tokenizer(texts, add_special_tokens=True)["input_ids"]]

    @torch.inference_mode()
    def encode(
        self, texts: list[str], *, normalize: bool | None = None, truncate: bool = True
    ) -> tuple[torch.Tensor, list[int]]:
        """Embed `texts` in one forward pass; returns (float32 [N, D] on CPU, tokens read per text)."""
        if not truncate:
            too_long = [i for i, n in enumerate(self.count_tokens(texts)) if n > self.max_length]
            if too_long:
                raise InvalidRequest(
                    f"Input {too_long[0]} is longer than the model's {self.max_length} tokens and truncate is false.",
                    param="input",
                )
        batch = self.tokenizer(
            texts, padding=True, truncation=True, max_length=self.max_length, return_tensors="pt"
        ).to(self.device)
        hidden = self.model(**batch).last_hidden_state
        mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        mode = self.pooling.mode
        if mode == "cls":
            pooled = hidden[:, 0]
        elif mode == "max":
            pooled = hidden.masked_fill(mask == 0, float("-inf")).max(dim=1).values
        elif mode == "last":
            last = batch["attention_mask"].sum(dim=1) - 1
            pooled = hidden[torch.arange(hidden.shape[0], device=hidden.device), last]
        else:
            pooled = (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1e-9)
        pooled = pooled.float()
        if self.pooling.normalize if normalize is None else normalize:
            pooled = torch.nn.functional.normalize(pooled, p=2, dim=-1)
        return pooled.cpu(), batch["attention_mask"].sum(dim=1).tolist()

    def encode_rows(self, texts: list[str], normalize: bool | None, truncate: bool) -> list[tuple[list[float], int]]:
        """`encode` as one (vector, tokens) pair per text: what the micro-batcher scatters back."""
        vectors, tokens = self.encode(texts, normalize=normalize, truncate=truncate)
        return list(zip(vectors.tolist(), tokens, strict=True))

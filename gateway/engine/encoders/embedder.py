"""Sentence embeddings with the pooling a sentence-transformers checkpoint declares."""

from __future__ import annotations

import json
from collections.abc import Sequence
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
    def __init__(
        self, model: Any, tokenizer: Any, device: torch.device, pooling: PoolingConfig, max_length: int | None = None
    ) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.device = device
        self.pooling = pooling
        # The longest input embedded whole: sentence-transformers' max_seq_length where the checkpoint
        # declares one (all-MiniLM-L6-v2: 256, although its position table has 512 rows: it was trained
        # on 128 and is documented to cut at 256), else the position table or the tokenizer's limit.
        limits = [
            max_length,
            pooling.max_seq_length,
            getattr(model.config, "max_position_embeddings", None),
            tokenizer.model_max_length if tokenizer.model_max_length < 1_000_000 else None,
        ]
        self.max_length = min(x for x in limits if x) if any(limits) else 512
        self.dimensions = int(model.config.hidden_size)
        self.vocab_size = int(model.get_input_embeddings().num_embeddings)
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0

    def check_ids(self, inputs: Sequence[str | list[int]]) -> None:
        """Token-ID inputs must index the model's embedding table (an IndexError in the forward otherwise)."""
        for index, item in enumerate(inputs):
            if isinstance(item, list) and item and (min(item) < 0 or max(item) >= self.vocab_size):
                bad = next(t for t in item if not 0 <= t < self.vocab_size)
                raise InvalidRequest(
                    f"Input {index} has the token ID {bad}, outside the model's vocabulary of {self.vocab_size}.",
                    param="input",
                )

    def token_ids(self, inputs: Sequence[str | list[int]], truncate: bool) -> list[list[int]]:
        """Each input as the IDs the model reads: text tokenised with the model's special tokens, token
        IDs as given. Longer than max_length: cut when `truncate`, else refused."""
        texts = [item for item in inputs if isinstance(item, str)]
        encoded = iter(
            self.tokenizer(texts, truncation=truncate, max_length=self.max_length if truncate else None)["input_ids"]
            if texts
            else ()
        )
        rows = [list(next(encoded)) if isinstance(item, str) else item for item in inputs]
        for index, ids in enumerate(rows):
            if len(ids) > self.max_length:
                if not truncate:
                    raise InvalidRequest(
                        f"Input {index} has {len(ids)} tokens; this model's maximum context length is "
                        f"{self.max_length} tokens. Shorten the input.",
                        param="input",
                        code="context_length_exceeded",
                    )
                rows[index] = ids[: self.max_length]
        return rows

    @torch.inference_mode()
    def encode(
        self, inputs: Sequence[str | list[int]], *, normalize: bool | None = None, truncate: bool = True
    ) -> tuple[torch.Tensor, list[int]]:
        """Embed `inputs` (texts or token-ID lists) in one forward pass; returns (float32 [N, D] on CPU,
        tokens read per input)."""
        rows = self.token_ids(inputs, truncate)
        lengths = [len(ids) for ids in rows]
        input_ids = torch.full((len(rows), max(lengths)), self.pad_id, dtype=torch.long)
        attention = torch.zeros_like(input_ids)
        for i, ids in enumerate(rows):  # right padding: "last" pooling reads the last real position
            input_ids[i, : len(ids)] = torch.tensor(ids, dtype=torch.long)
            attention[i, : len(ids)] = 1
        input_ids, attention = input_ids.to(self.device), attention.to(self.device)
        hidden = self.model(input_ids=input_ids, attention_mask=attention).last_hidden_state
        mask = attention.unsqueeze(-1).to(hidden.dtype)
        mode = self.pooling.mode
        if mode == "cls":
            pooled = hidden[:, 0]
        elif mode == "max":
            pooled = hidden.masked_fill(mask == 0, float("-inf")).max(dim=1).values
        elif mode == "last":
            last = attention.sum(dim=1) - 1
            pooled = hidden[torch.arange(hidden.shape[0], device=hidden.device), last]
        else:
            pooled = (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1e-9)
        pooled = pooled.float()
        if self.pooling.normalize if normalize is None else normalize:
            pooled = torch.nn.functional.normalize(pooled, p=2, dim=-1)
        return pooled.cpu(), lengths

    def encode_rows(
        self, inputs: Sequence[str | list[int]], normalize: bool | None, truncate: bool
    ) -> list[tuple[list[float], int]]:
        """`encode` as one (vector, tokens) pair per input: what the micro-batcher scatters back."""
        vectors, tokens = self.encode(inputs, normalize=normalize, truncate=truncate)
        return list(zip(vectors.tolist(), tokens, strict=True))

"""The generic step model: any transformers causal LM, through its own forward.

Each sequence owns a slot of a `SlotKVCache`; a `transformers.Cache` view writes
each new key/value at the sequence's own position and hands back that sequence's
history, and a 4D mask per call says what each query may see. Decoding sequences
share one forward call; each prompt chunk gets its own. Slower than the fused
Llama path, but it runs every architecture that uses the cache API.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

from gateway.engine.generation.step import PrefillChunk, PromptScores, SlotKVCache, StepPlan, add_scores
from gateway.engine.runtime.packed import LogitsLinear


class Float32Head(torch.nn.Module):
    """The output projection in float32 whatever the model's dtype: logits rounded to bfloat16 step
    by 0.125 at a small model's magnitudes, so near-ties became coin flips decided by the kernels.
    Holds a float32 copy of the weight (a tied embedding keeps its own); `weight` stays the
    original for code that reads its shape."""

    def __init__(self, head: torch.nn.Linear, batch_hint: int) -> None:
        super().__init__()
        self.weight, self.bias = head.weight, head.bias
        self.in_features, self.out_features = head.weight.shape[1], head.weight.shape[0]
        bias = getattr(head, "bias", None)
        # float16 weights with float32 arithmetic where that is exact, else a float32 copy
        self._linear = LogitsLinear(head.weight.detach(), None if bias is None else bias.detach(), batch_hint)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._linear(x.float())


def float32_head(model: Any, batch_hint: int) -> None:
    """Make `model`'s logits float32 (see `Float32Head`), where its head is a plain linear layer."""
    head = model.get_output_embeddings()
    if isinstance(head, torch.nn.Linear) and head.weight.dtype != torch.float32:
        model.set_output_embeddings(Float32Head(head, batch_hint))


class _SlotLayer(CacheLayerMixin):
    """One layer's view of the slot cache for the current call."""

    is_sliding = False

    def __init__(self, store: SlotKVCache, index: int, view: _View) -> None:
        super().__init__()
        self.store, self.index, self.view = store, index, view
        self.is_initialized = True

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        return None

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        keys, values = self.store.keys[self.index], self.store.values[self.index]
        view = self.view
        if view.chunk is None:  # decode: one new token per row, each at its own position
            keys[view.slots, :, view.positions] = key_states[:, :, 0]
            values[view.slots, :, view.positions] = value_states[:, :, 0]
            return keys[view.slots, :, : view.length], values[view.slots, :, : view.length]
        chunk = view.chunk
        keys[chunk.slot, :, chunk.start : chunk.end] = key_states[0]
        values[chunk.slot, :, chunk.start : chunk.end] = value_states[0]
        return keys[chunk.slot : chunk.slot + 1, :, : chunk.end], values[chunk.slot : chunk.slot + 1, :, : chunk.end]

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.view.length, 0

    def get_seq_length(self) -> int:
        return self.view.length

    def get_max_length(self) -> int:
        return self.store.max_len


class _View:
    """What the current forward call reads and writes."""

    slots: torch.Tensor
    positions: torch.Tensor
    length: int = 0
    chunk: PrefillChunk | None = None


class _SlotCacheView(Cache):
    def __init__(self, store: SlotKVCache, view: _View) -> None:
        super().__init__(layers=[_SlotLayer(store, i, view) for i in range(len(store.keys))])


class HFStepModel:
    def __init__(self, model: Any, *, slots: int, max_len: int) -> None:
        config = model.get_text_config() if hasattr(model, "get_text_config") else model.config
        heads = config.num_attention_heads
        kv_heads = getattr(config, "num_key_value_heads", None) or heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
        param = next(model.parameters())
        float32_head(model, slots)
        self.model = model
        self.device, self.dtype = param.device, param.dtype
        self.vocab_size = int(model.get_output_embeddings().weight.shape[0])
        self.max_len = max_len
        self.cache = SlotKVCache(config.num_hidden_layers, slots, kv_heads, head_dim, max_len, self.dtype, self.device)
        self._view = _View()
        self._past = _SlotCacheView(self.cache, self._view)
        # sdpa takes a boolean mask (True = attend); eager attention adds the mask to the scores.
        self._bool_mask = getattr(model.config, "_attn_implementation", "eager") in ("sdpa", "flash_attention_2")

    def copy_slot(self, source: int, target: int, length: int) -> None:
        self.cache.copy_slot(source, target, length)

    @torch.inference_mode()
    def score(self, tokens: list[int], top_n: int = 0) -> PromptScores:
        """Log-probability of each token after the first given those before it, and the `top_n`
        most likely tokens at each position (no cache needed)."""
        ids = torch.tensor([tokens], device=self.device)
        scores = PromptScores([], [])
        add_scores(scores, self.model(input_ids=ids).logits[0, :-1], ids[0, 1:], top_n)
        return scores

    def _mask(self, allowed: torch.Tensor) -> torch.Tensor:
        if self._bool_mask:
            return allowed
        return torch.zeros(allowed.shape, dtype=self.dtype).masked_fill(~allowed, torch.finfo(self.dtype).min)

    def _call(self, tokens: torch.Tensor, positions: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
        out = self.model(
            input_ids=tokens.to(self.device),
            position_ids=positions.to(self.device),
            attention_mask=self._mask(allowed).to(self.device),
            past_key_values=self._past,
            use_cache=True,
            logits_to_keep=1,
        )
        return out.logits[:, -1, :].float()

    @torch.inference_mode()
    def forward(self, plan: StepPlan) -> torch.Tensor:
        self.cache.reserve(plan.longest)
        view = self._view
        rows = []
        if plan.decode_tokens:
            positions = torch.tensor(plan.decode_positions)
            view.chunk = None
            view.slots = torch.tensor(plan.decode_slots, device=self.device)
            view.positions = positions.to(self.device)
            view.length = int(positions.max()) + 1
            allowed = torch.arange(view.length)[None, :] <= positions[:, None]
            rows.append(
                self._call(torch.tensor(plan.decode_tokens)[:, None], positions[:, None], allowed[:, None, None])
            )
        for chunk in plan.prefills:
            view.chunk = chunk
            view.length = chunk.end
            positions = torch.arange(chunk.start, chunk.end)
            allowed = torch.arange(chunk.end)[None, :] <= positions[:, None]
            logits = self._call(torch.tensor([chunk.tokens]), positions[None], allowed[None, None])
            if chunk.last:
                rows.append(logits)
        view.chunk = None
        return torch.cat(rows) if rows else torch.empty(0, self.vocab_size)

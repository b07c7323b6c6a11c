"""One forward pass of the continuous-batching engine, as the scheduler plans it.

A step feeds one token for every sequence that is decoding, plus chunks of the
prompts of sequences still being prefilled, all in one pass. The step models
(the fused Llama-family path and the generic transformers path) turn a plan into
logits; the scheduler decides what goes into each plan.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import NamedTuple, Protocol

import torch


@dataclass
class PrefillChunk:
    """Prompt tokens `tokens` of the sequence in `slot`, starting at position `start`."""

    slot: int
    start: int
    tokens: list[int]
    last: bool  # the chunk ends the prompt: its last position's logits are wanted

    @property
    def end(self) -> int:
        return self.start + len(self.tokens)


@dataclass
class StepPlan:
    """What one forward pass computes.

    Decode entries feed `decode_tokens[i]` at position `decode_positions[i]` (the
    sequence's length before the step) for the sequence in `decode_slots[i]`.
    """

    decode_slots: list[int] = field(default_factory=list)
    decode_tokens: list[int] = field(default_factory=list)
    decode_positions: list[int] = field(default_factory=list)
    prefills: list[PrefillChunk] = field(default_factory=list)

    @property
    def tokens(self) -> int:
        return len(self.decode_tokens) + sum(len(c.tokens) for c in self.prefills)

    @property
    def longest(self) -> int:
        """The longest sequence after this step, in tokens."""
        ends = [p + 1 for p in self.decode_positions] + [c.end for c in self.prefills]
        return max(ends, default=0)

    def __bool__(self) -> bool:
        return bool(self.decode_tokens or self.prefills)


class StepModel(Protocol):
    """Runs plans against a KV cache with one slot per running sequence."""

    vocab_size: int
    max_len: int

    def forward(self, plan: StepPlan) -> torch.Tensor:
        """Float32 logits, one row per decode entry, then one per prefill chunk with `last` set."""
        ...

    def copy_slot(self, source: int, target: int, length: int) -> None:
        """Give `target` the first `length` cached positions of `source` (n > 1 shares a prompt)."""
        ...

    def score(self, tokens: list[int], top_n: int = 0) -> PromptScores:
        """Log-probability of each token after the first, given the tokens before it (TGI's prefill
        details, OpenAI's echo), and the `top_n` most likely tokens at each of those positions;
        runs beside the batch without touching its slots."""
        ...


class PromptScores(NamedTuple):
    """A prompt scored: for each token after the first, its log-probability, and the most likely
    tokens at its position as (token IDs, log-probabilities), empty when none were asked for."""

    logprobs: list[float]
    top: list[tuple[list[int], list[float]]]


def add_scores(scores: PromptScores, logits: torch.Tensor, following: torch.Tensor, top_n: int) -> None:
    """Append to `scores` what float32 `logits` (one row per position) say of the `following` tokens."""
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    scores.logprobs.extend(logprobs.gather(1, following[:, None])[:, 0].tolist())
    if top_n > 0:
        best = torch.topk(logprobs, min(top_n, logprobs.shape[-1]), dim=-1)
        scores.top.extend(zip(best.indices.tolist(), best.values.tolist(), strict=True))


class SlotKVCache:
    """Keys and values for `slots` sequences, per layer `[slots, kv_heads, capacity, head_dim]`.

    The capacity grows (doubling) as sequences get longer, up to `max_len`, so memory
    is bounded by `slots x max_len` but only what is used is paid for.
    """

    def __init__(
        self,
        layers: int,
        slots: int,
        kv_heads: int,
        head_dim: int,
        max_len: int,
        dtype: torch.dtype,
        device: torch.device,
        initial: int = 256,
    ) -> None:
        self.shape = (slots, kv_heads, head_dim)
        self.max_len = max_len
        self.dtype, self.device = dtype, device
        self.capacity = min(initial, max_len)
        self.keys = [self._new(self.capacity) for _ in range(layers)]
        self.values = [self._new(self.capacity) for _ in range(layers)]

    def _new(self, capacity: int) -> torch.Tensor:
        slots, heads, dim = self.shape
        return torch.zeros(slots, heads, capacity, dim, dtype=self.dtype, device=self.device)

    def reserve(self, length: int) -> None:
        """Make room for sequences of `length` tokens."""
        if length <= self.capacity:
            return
        if length > self.max_len:
            raise ValueError(f"a sequence of {length} tokens exceeds the cache's {self.max_len}")
        capacity = self.capacity
        while capacity < length:
            capacity *= 2
        capacity = min(capacity, self.max_len)
        for store in (self.keys, self.values):
            for i, old in enumerate(store):
                grown = self._new(capacity)
                grown[:, :, : self.capacity] = old
                store[i] = grown
        self.capacity = capacity

    def copy_slot(self, source: int, target: int, length: int) -> None:
        for store in (self.keys, self.values):
            for tensor in store:
                tensor[target, :, :length] = tensor[source, :, :length]

    def bytes_per_token(self) -> int:
        slots, heads, dim = self.shape
        return 2 * len(self.keys) * heads * dim * torch.finfo(self.dtype).bits // 8

"""Per-sequence token selection: penalties, temperature, top-k, top-p, seeded sampling.

Every sequence owns its `torch.Generator`, so a seed is reproducible per request
and the global RNG is never touched.
"""

from __future__ import annotations

import secrets

import torch

from gateway.domain import SamplingParams


class SequenceSampler:
    """Sampling state of one sequence: its parameters, RNG and token counts."""

    def __init__(self, params: SamplingParams, prompt_ids: list[int], vocab_size: int, seed_offset: int = 0) -> None:
        self.params = params
        self.generator: torch.Generator | None = None
        if not params.greedy:
            seed = params.seed + seed_offset if params.seed is not None else secrets.randbits(63)
            self.generator = torch.Generator(device="cpu").manual_seed(seed)
        self.vocab_size = vocab_size
        self.counts: torch.Tensor | None = None
        self.seen: torch.Tensor | None = None
        if params.presence_penalty or params.frequency_penalty:
            self.counts = torch.zeros(vocab_size, dtype=torch.float32)
        if params.repetition_penalty != 1.0:
            self.seen = torch.zeros(vocab_size, dtype=torch.bool)
            if prompt_ids:
                self.seen[torch.tensor(prompt_ids, dtype=torch.long).clamp_(0, vocab_size - 1)] = True

    @property
    def plain_greedy(self) -> bool:
        return self.params.greedy and self.counts is None and self.seen is None

    def observe(self, token_id: int) -> None:
        if self.counts is not None and token_id < self.vocab_size:
            self.counts[token_id] += 1
        if self.seen is not None and token_id < self.vocab_size:
            self.seen[token_id] = True

    def _penalised(self, logits: torch.Tensor) -> torch.Tensor:
        p = self.params
        if self.seen is not None:
            scored = torch.where(logits > 0, logits / p.repetition_penalty, logits * p.repetition_penalty)
            logits = torch.where(self.seen, scored, logits)
        if self.counts is not None:
            logits = logits - p.frequency_penalty * self.counts - p.presence_penalty * (self.counts > 0).float()
        return logits

    def choose(self, logits: torch.Tensor) -> tuple[int, float]:
        """Pick the next token from one row of float32 CPU logits; returns (token, logprob)."""
        logits = self._penalised(logits[: self.vocab_size])
        p = self.params
        if p.greedy:
            token = int(torch.argmax(logits))
            return token, float(torch.log_softmax(logits, -1)[token])
        logits = logits / p.temperature
        if p.top_k and p.top_k < logits.numel():
            kth = torch.topk(logits, p.top_k).values[-1]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        if p.top_p < 1.0:
            sorted_logits, order = torch.sort(logits, descending=True)
            cumulative = torch.softmax(sorted_logits, -1).cumsum(-1)
            drop = cumulative - torch.softmax(sorted_logits, -1) >= p.top_p  # keep the token that crosses top_p
            logits = logits.masked_fill(torch.zeros_like(drop).scatter(0, order, drop), float("-inf"))
        logprobs = torch.log_softmax(logits, -1)
        token = int(torch.multinomial(logprobs.exp(), 1, generator=self.generator))
        return token, float(logprobs[token])

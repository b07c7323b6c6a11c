"""Token selection for a batch of sequences, each with its own sampling settings.

Every sequence owns its `torch.Generator`, so a seed is reproducible per request
whatever else shares the batch, and the global RNG is never touched. The work is
vectorised over the rows of a step: greedy rows take one argmax, sampled rows one
softmax and one inverse-CDF draw (a single uniform number from each row's own
generator), so the cost per step hardly grows with the batch.
"""

from __future__ import annotations

import secrets

import torch

from gateway.domain import SamplingParams
from gateway.engine.generation.grammar import Constraint, apply_masks


class SequenceSampler:
    """Sampling state of one sequence: its parameters, RNG and token counts."""

    def __init__(
        self,
        params: SamplingParams,
        prompt_ids: list[int],
        vocab_size: int,
        seed_offset: int = 0,
        constraint: Constraint | None = None,
    ) -> None:
        self.params = params
        self.constraint = constraint
        self.generator: torch.Generator | None = None
        if not params.greedy:
            seed = params.seed + seed_offset if params.seed is not None else secrets.randbits(63)
            # torch takes seeds in [0, 2**64) (negatives as their two's complement): wrap, so an
            # n > 1 request seeded near the top of the range cannot overflow
            self.generator = torch.Generator(device="cpu").manual_seed(seed % 2**64)
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
    def penalised(self) -> bool:
        return self.counts is not None or self.seen is not None

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
        """Pick the next token from one row of logits; returns (token, logprob)."""
        tokens, logprobs = select(logits[None], [self])
        return tokens[0], logprobs[0]


def select(logits: torch.Tensor, samplers: list[SequenceSampler]) -> tuple[list[int], list[float]]:
    """The next token of each row of float32 CPU `logits` [rows, >= vocab], and its log-probability
    under the distribution it was drawn from (after penalties, temperature, top-k and top-p)."""
    vocab = samplers[0].vocab_size
    logits = logits[:, :vocab]
    constrained = [r for r, s in enumerate(samplers) if s.constraint is not None]
    if constrained:
        logits = logits.clone()  # the forward pass's logits stay as the model gave them
        apply_masks(logits, constrained, [samplers[r].constraint for r in constrained])  # type: ignore[misc]
    if any(s.penalised for s in samplers):
        logits = logits.clone() if not constrained else logits
        for row, sampler in enumerate(samplers):
            if sampler.penalised:
                logits[row] = sampler._penalised(logits[row])
    tokens = [0] * len(samplers)
    logprobs = [0.0] * len(samplers)
    greedy = [r for r, s in enumerate(samplers) if s.params.greedy]
    sampled = [r for r, s in enumerate(samplers) if not s.params.greedy]
    if greedy:
        rows = logits if len(greedy) == len(samplers) else logits[greedy]
        best = rows.argmax(-1)
        chosen = rows.gather(1, best[:, None])[:, 0] - torch.logsumexp(rows, -1)
        for r, token, logprob in zip(greedy, best.tolist(), chosen.tolist(), strict=True):
            tokens[r], logprobs[r] = token, logprob
    if sampled:
        picked, picked_logprobs = _draw(logits[sampled], [samplers[r] for r in sampled])
        for r, token, logprob in zip(sampled, picked, picked_logprobs, strict=True):
            tokens[r], logprobs[r] = token, logprob
    return tokens, logprobs


def _draw(logits: torch.Tensor, samplers: list[SequenceSampler]) -> tuple[list[int], list[float]]:
    params = [s.params for s in samplers]
    logits = logits / torch.tensor([p.temperature for p in params])[:, None]
    vocab = logits.shape[-1]
    top_k = [p.top_k if 0 < p.top_k < vocab else 0 for p in params]
    if any(top_k):
        rows = [r for r, k in enumerate(top_k) if k]
        values = torch.topk(logits[rows], max(top_k), dim=-1).values
        kth = values.gather(1, torch.tensor([top_k[r] - 1 for r in rows])[:, None])
        logits[rows] = logits[rows].masked_fill(logits[rows] < kth, float("-inf"))
    top_p = [p.top_p for p in params]
    if any(p < 1.0 for p in top_p):
        rows = [r for r, p in enumerate(top_p) if p < 1.0]
        sorted_logits, order = torch.sort(logits[rows], descending=True, dim=-1)
        probs = torch.softmax(sorted_logits, -1)
        # drop a token once the mass before it reaches top_p: the token that crosses it stays
        drop = (probs.cumsum(-1) - probs) >= torch.tensor([top_p[r] for r in rows])[:, None]
        logits[rows] = logits[rows].masked_fill(torch.zeros_like(drop).scatter(1, order, drop), float("-inf"))
    logprobs = torch.log_softmax(logits, -1)
    cdf = logprobs.exp().cumsum(-1)
    draws = torch.cat([torch.rand(1, generator=s.generator) for s in samplers])
    # right=True: the first token whose cumulative mass exceeds the draw (never a zero-mass token)
    chosen = torch.searchsorted(cdf, (draws * cdf[:, -1])[:, None], right=True).clamp_(max=vocab - 1)
    return chosen[:, 0].tolist(), logprobs.gather(1, chosen)[:, 0].tolist()

"""The most likely next tokens at a decoding step (TGI's `top_n_tokens`), and OpenAI's logprobs
of a chosen token (its raw log-probability, its own text and bytes, the most likely tokens)."""

from __future__ import annotations

from typing import Any

import torch

from gateway.domain import TokenText, TopToken
from gateway.engine.generation.token_bytes import TokenBytes


def top_tokens(logits: torch.Tensor, n: int, tokenizer: Any, vocab_size: int) -> tuple[TopToken, ...]:
    """The `n` most likely tokens of one row of logits, by the model's distribution before
    sampling settings (temperature, top-k/top-p, penalties) are applied."""
    if n <= 0:
        return ()
    logprobs = torch.log_softmax(logits[:vocab_size].float(), dim=-1)
    best = torch.topk(logprobs, min(n, logprobs.numel()))
    special = set(tokenizer.all_special_ids)
    return tuple(
        TopToken(int(i), tokenizer.decode([int(i)]), float(lp), int(i) in special)
        for lp, i in zip(best.values, best.indices, strict=True)
    )


def ranked(logprobs: torch.Tensor, n: int, pieces: TokenBytes, special: set[int]) -> tuple[TopToken, ...]:
    """The `n` most likely tokens of a row of log-probabilities, with their own text and bytes."""
    if n <= 0:
        return ()
    best = torch.topk(logprobs, min(n, logprobs.numel()))
    out = []
    for lp, i in zip(best.values.tolist(), best.indices.tolist(), strict=True):
        own = pieces(i)
        out.append(TopToken(i, own.text, lp, i in special, own.raw))
    return tuple(out)


def chosen_logprobs(
    logits: torch.Tensor, token: int, n: int, pieces: TokenBytes, vocab_size: int, special: set[int]
) -> tuple[float, TokenText, tuple[TopToken, ...]]:
    """A chosen token's log-probability under the raw distribution of one row of logits (as
    OpenAI and vLLM report it: before penalties, temperature, top-k and top-p), the token
    itself, and the `n` most likely tokens."""
    logprobs = torch.log_softmax(logits[:vocab_size].float(), dim=-1)
    return float(logprobs[token]), pieces(token), ranked(logprobs, n, pieces, special)

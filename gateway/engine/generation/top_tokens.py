"""The most likely next tokens at a decoding step (TGI's `top_n_tokens`)."""

from __future__ import annotations

from typing import Any

import torch

from gateway.domain import TopToken


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

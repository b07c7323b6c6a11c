"""What a forward pass's logits become: for each sequence that samples from them, its next token
(`sampling.py`, one vectorised draw), its top tokens when asked for (`top_tokens.py`), its text
(the TextAssembler built at admission), whether it has finished, and the events its request's
consumer gets. Runs on the compute thread, after the scheduler's forward pass.

A fault belongs to the request it happens in: a draw, a detokenisation or a top-tokens listing
that raises fails that request alone (through the scheduler's `fail`), the others go on.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from gateway.domain import FinishReason, StreamEnd, TokenDelta, TokenText, TopToken, Usage
from gateway.engine.generation.jobs import GenerationJob, Sequence
from gateway.engine.generation.sampling import select
from gateway.engine.generation.token_bytes import TokenBytes
from gateway.engine.generation.top_tokens import chosen_logprobs, top_tokens

Fail = Callable[[GenerationJob, BaseException, str], None]


class OutputProcessor:
    def __init__(self, tokenizer: Any, vocab_size: int, eos_ids: frozenset[int], fail: Fail) -> None:
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size
        self.eos_ids = eos_ids
        self.fail = fail  # ends one job with an error, freeing its slots
        self.pieces = TokenBytes(tokenizer)  # each token's own text and bytes (OpenAI logprobs)
        self.special = set(tokenizer.all_special_ids)

    def process(self, logits: torch.Tensor, rows: list[int], chosen: list[Sequence]) -> list[Sequence]:
        """Advance `chosen[i]` by `logits[rows[i]]`; returns the sequences that finished, whose
        slots are the scheduler's to free (their requests have had their last event)."""
        if logits.device.type != "cpu":  # a GPU's logits: sampling, penalties, masks and RNGs are on the CPU
            logits = logits.cpu()
        picked = logits if rows == list(range(logits.shape[0])) else logits[rows]
        tokens, logprobs = self._select(picked, chosen)
        finished = []
        for i, seq in enumerate(chosen):
            if seq.done:  # its job failed or was dropped meanwhile
                continue
            try:
                params, own, logprob = seq.job.params, None, logprobs[i]
                top: tuple[TopToken, ...] = ()
                if params.logprobs:
                    logprob, own, top = chosen_logprobs(
                        picked[i], tokens[i], params.top_n, self.pieces, self.vocab_size, self.special
                    )
                elif params.top_n:
                    top = top_tokens(picked[i], params.top_n, self.tokenizer, self.vocab_size)
                if self._advance(seq, tokens[i], logprob, top, own):
                    finished.append(seq)
            except Exception as exc:
                self.fail(seq.job, exc, "detokenizing its token or listing the top tokens")
        return finished

    def _select(self, picked: torch.Tensor, chosen: list[Sequence]) -> tuple[list[int], list[float]]:
        """The sequences' next tokens, in one vectorised call; if it raises, row by row, failing
        the jobs whose own rows raise (their tokens are placeholders, never handed out)."""
        try:
            return select(picked, [seq.sampler for seq in chosen])
        except Exception:
            pass
        tokens: list[int] = []
        logprobs: list[float] = []
        for i, seq in enumerate(chosen):
            try:
                (token,), (logprob,) = select(picked[i : i + 1], [seq.sampler])
            except Exception as exc:
                if not seq.done:  # a sibling's row may have failed the job already
                    self.fail(seq.job, exc, "sampling")
                token, logprob = -1, 0.0
            tokens.append(token)
            logprobs.append(logprob)
        return tokens, logprobs

    def _advance(
        self, seq: Sequence, token: int, logprob: float, top: tuple[TopToken, ...], own: TokenText | None
    ) -> bool:
        """Hand out one token; True when it finished the sequence (the last one of its job also
        ends the job's stream with the usage)."""
        job = seq.job
        seq.sampler.observe(token)
        constraint = seq.sampler.constraint
        if constraint is not None and token not in self.eos_ids and not constraint.consume(token):
            raise RuntimeError(f"the grammar refused the token it allowed ({constraint.error})")
        seq.produced += 1
        job.produced += 1
        special = token in self.eos_ids
        text, finish = self._text(seq, token, special)
        job.emit(job, TokenDelta(seq.index, text, token, logprob, special, finish, top, own))
        if finish is None:
            seq.token = token
            return False
        seq.done = True
        job.live -= 1
        if job.live == 0:
            job.emit(job, StreamEnd(Usage(len(job.prompt_ids), job.produced, job.cached)))
        return True

    def _text(self, seq: Sequence, token: int, special: bool) -> tuple[str, FinishReason | None]:
        """The text `token` adds, and why the sequence ends with it, if it does."""
        if special:
            return seq.text.flush(), FinishReason.EOS
        text = seq.text.push(token)
        if seq.text.stopped:
            return text, FinishReason.STOP
        if seq.produced >= seq.job.max_tokens:
            return text + seq.text.flush(), FinishReason.LENGTH
        return text, None

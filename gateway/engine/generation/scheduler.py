"""Continuous batching: which sequences share each forward pass, and what their tokens become.

Runs on the engine's compute thread only (no locks, no asyncio). Requests join the
running batch between steps and leave it when they finish; each step feeds one
token per decoding sequence plus at most `prefill_chunk` prompt tokens, so a long
new prompt is prefilled over several steps instead of stalling every stream. A
request with n > 1 choices prefills its prompt once and copies the cached prompt
to its other sequences' slots.

A fault belongs to the request it happens in: an exception while admitting, sampling,
detokenising or reporting top tokens for one request fails that request alone and frees
its slots. A forward pass that raises cannot say whose input was at fault, so its requests
are retried one by one (rewriting the same cache positions is harmless) and only those
whose own pass still fails are failed.
"""

from __future__ import annotations

import heapq
import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch

from gateway.detokenize import TextAssembler
from gateway.domain import FinishReason, SamplingParams, StreamEnd, TokenDelta, Usage
from gateway.engine.generation.sampling import SequenceSampler, select
from gateway.engine.generation.step import PrefillChunk, StepModel, StepPlan
from gateway.engine.generation.top_tokens import top_tokens

log = logging.getLogger(__name__)

Event = TokenDelta | StreamEnd | BaseException


@dataclass(eq=False)
class GenerationJob:
    """One request: `params.n` sequences over the same prompt."""

    prompt_ids: list[int]
    params: SamplingParams
    max_tokens: int
    emit: Callable[[GenerationJob, Event], None]
    keep_stop: bool = False  # the text ends with the matched stop sequence (TGI)
    request_id: str = ""  # for the log
    enqueued_at: float = field(default_factory=time.monotonic)
    admitted_at: float = 0.0
    produced: int = 0
    live: int = 0  # sequences still generating
    sequences: list[_Sequence] = field(default_factory=list)


class _Sequence:
    __slots__ = ("job", "index", "slot", "sampler", "text", "prefilled", "length", "token", "produced", "done")

    def __init__(self, job: GenerationJob, index: int, slot: int, sampler: SequenceSampler, text: TextAssembler) -> None:
        self.job, self.index, self.slot = job, index, slot
        self.sampler, self.text = sampler, text
        self.prefilled = 0  # prompt tokens in the cache (the first sequence of a job prefills for all)
        self.length = 0  # tokens in the cache
        self.token: int | None = None  # the next token to feed
        self.produced = 0
        self.done = False

    @property
    def prefilling(self) -> bool:
        return self.prefilled < len(self.job.prompt_ids)


@dataclass(eq=False)
class _Part:
    """One job's share of a step: its decoding sequences, or its leader's next prompt chunk."""

    job: GenerationJob
    decoding: list[_Sequence] = field(default_factory=list)
    chunk: PrefillChunk | None = None


def _plan_of(parts: list[_Part]) -> StepPlan:
    """The forward pass for `parts`; its logits rows are the decoding sequences in order, then
    the prompt chunks that end their prompt."""
    plan = StepPlan()
    for part in parts:
        for seq in part.decoding:
            plan.decode_slots.append(seq.slot)
            plan.decode_tokens.append(seq.token)  # type: ignore[arg-type]
            plan.decode_positions.append(seq.length)
    plan.prefills = [part.chunk for part in parts if part.chunk is not None]
    return plan


class Scheduler:
    def __init__(
        self,
        step: StepModel,
        tokenizer: Any,
        *,
        slots: int,
        prefill_chunk: int,
        eos_ids: Iterable[int],
    ) -> None:
        self.step_model = step
        self.tokenizer = tokenizer
        self.prefill_chunk = prefill_chunk
        self.eos_ids = frozenset(eos_ids)
        self.vocab_size = step.vocab_size
        self._free = list(range(slots))
        heapq.heapify(self._free)  # lowest slot first keeps the running slots dense
        self.jobs: list[GenerationJob] = []  # admitted, in admission order

    # admission -------------------------------------------------------------
    def free_slots(self) -> int:
        return len(self._free)

    def admit(self, job: GenerationJob) -> None:
        """Give `job` its slots; raises (holding nothing) if its sampler or detokeniser cannot be built."""
        n = job.params.n
        assert n <= len(self._free)
        samplers = [SequenceSampler(job.params, job.prompt_ids, self.vocab_size, seed_offset=i) for i in range(n)]
        texts = [TextAssembler(self.tokenizer, job.params.stop, job.keep_stop) for _ in range(n)]
        job.admitted_at = time.monotonic()
        for i in range(n):
            job.sequences.append(_Sequence(job, i, heapq.heappop(self._free), samplers[i], texts[i]))
        job.live = n
        self.jobs.append(job)

    def drop(self, job: GenerationJob) -> None:
        """Remove a job (its client left, or it failed); its slots are free for the next step."""
        for seq in job.sequences:
            if not seq.done:
                seq.done = True
                heapq.heappush(self._free, seq.slot)
        job.live = 0
        if job in self.jobs:
            self.jobs.remove(job)

    def fail(self, job: GenerationJob, error: BaseException, during: str) -> None:
        """End one job with `error`: its slots are freed, its client gets the error, the others go on."""
        log.error(
            "request %s failed while %s (%s: %s); the other requests go on",
            job.request_id or "(no id)", during, type(error).__name__, error, exc_info=error,
        )
        self.drop(job)
        job.emit(job, error)

    # one step --------------------------------------------------------------
    def plan(self) -> list[_Part]:
        """The next step: every decoding sequence, then prompt chunks up to the budget."""
        parts: list[_Part] = []
        budget = self.prefill_chunk
        for job in self.jobs:
            leader = job.sequences[0]
            if leader.prefilling:
                if budget <= 0:
                    continue
                chunk = job.prompt_ids[leader.prefilled : leader.prefilled + budget]
                last = leader.prefilled + len(chunk) == len(job.prompt_ids)
                parts.append(_Part(job, chunk=PrefillChunk(leader.slot, leader.prefilled, chunk, last)))
                budget -= len(chunk)
                continue
            decoding = [seq for seq in job.sequences if not seq.done and seq.token is not None]
            if decoding:
                parts.append(_Part(job, decoding=decoding))
        return parts

    def step(self) -> int:
        """Run one forward pass and hand out its tokens; returns the sequences it served."""
        parts = self.plan()
        if not parts:
            return 0
        plan = _plan_of(parts)
        try:
            done = [(parts, self.step_model.forward(plan))]
        except Exception as exc:
            done = self._forward_each(parts, exc)
        for group, logits in done:
            self._hand_out(group, logits)
        return len(plan.decode_tokens) + len(plan.prefills)

    def _forward_each(self, parts: list[_Part], error: Exception) -> list[tuple[list[_Part], torch.Tensor]]:
        """After a failed pass: each job's share alone; the jobs whose own pass fails are failed."""
        if len(parts) == 1:
            self.fail(parts[0].job, error, "running the forward pass")
            return []
        log.warning("a forward pass of %d requests failed (%s: %s); running them one by one",
                    len(parts), type(error).__name__, error)
        done = []
        for part in parts:
            try:
                done.append(([part], self.step_model.forward(_plan_of([part]))))
            except Exception as exc:
                self.fail(part.job, exc, "running the forward pass")
        return done

    def _hand_out(self, parts: list[_Part], logits: torch.Tensor) -> None:
        """Advance the sequences of `parts` by the logits of their forward pass."""
        rows, chosen = self._rows(parts)
        if not chosen:
            return
        picked = logits if rows == list(range(logits.shape[0])) else logits[rows]
        tokens, logprobs = self._select(picked, chosen)
        for i, seq in enumerate(chosen):
            job = seq.job
            if seq.done:  # its job failed or was dropped meanwhile
                continue
            try:
                top_n = job.params.top_n
                top = top_tokens(picked[i], top_n, self.tokenizer, self.vocab_size) if top_n else ()
                self._advance(seq, tokens[i], logprobs[i], top)
            except Exception as exc:
                self.fail(job, exc, "detokenizing its token or listing the top tokens")

    def _rows(self, parts: list[_Part]) -> tuple[list[int], list[_Sequence]]:
        """Book the step's tokens into the sequences; which logits row each sequence samples from."""
        rows: list[int] = []
        chosen: list[_Sequence] = []
        for part in parts:
            for seq in part.decoding:
                seq.length += 1
                rows.append(len(rows))
                chosen.append(seq)
        row = len(rows)
        for part in parts:
            chunk = part.chunk
            if chunk is None:
                continue
            leader = part.job.sequences[0]
            leader.prefilled += len(chunk.tokens)
            leader.length = leader.prefilled
            if not chunk.last:
                continue
            try:
                for seq in part.job.sequences[1:]:  # siblings share the prompt's cache and its logits
                    self.step_model.copy_slot(leader.slot, seq.slot, leader.length)
                    seq.prefilled = seq.length = leader.length
            except Exception as exc:
                self.fail(part.job, exc, "sharing the prompt between its choices")
            else:
                rows.extend([row] * len(part.job.sequences))
                chosen.extend(part.job.sequences)
            row += 1
        return rows, chosen

    def _select(self, picked: torch.Tensor, chosen: list[_Sequence]) -> tuple[list[int], list[float]]:
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

    def _advance(self, seq: _Sequence, token: int, logprob: float, top: tuple) -> None:
        job = seq.job
        seq.sampler.observe(token)
        seq.produced += 1
        job.produced += 1
        finish = None
        special = token in self.eos_ids
        if special:
            text, finish = seq.text.flush(), FinishReason.EOS
        else:
            text = seq.text.push(token)
            if seq.text.stopped:
                finish = FinishReason.STOP
            elif seq.produced >= job.max_tokens:
                text, finish = text + seq.text.flush(), FinishReason.LENGTH
        job.emit(job, TokenDelta(seq.index, text, token, logprob, special, finish, top))
        if finish is None:
            seq.token = token
            return
        seq.done = True
        heapq.heappush(self._free, seq.slot)
        job.live -= 1
        if job.live == 0:
            self.jobs.remove(job)
            job.emit(job, StreamEnd(Usage(prompt_tokens=len(job.prompt_ids), completion_tokens=job.produced)))

    def fail_all(self, error: BaseException) -> None:
        for job in list(self.jobs):
            self.drop(job)
            job.emit(job, error)

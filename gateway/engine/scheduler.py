"""Continuous batching: which sequences share each forward pass, and what their tokens become.

Runs on the engine's compute thread only (no locks, no asyncio). Requests join the
running batch between steps and leave it when they finish; each step feeds one
token per decoding sequence plus at most `prefill_chunk` prompt tokens, so a long
new prompt is prefilled over several steps instead of stalling every stream. A
request with n > 1 choices prefills its prompt once and copies the cached prompt
to its other sequences' slots.
"""

from __future__ import annotations

import heapq
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch

from gateway.detokenize import TextAssembler
from gateway.domain import FinishReason, SamplingParams, StreamEnd, TokenDelta, Usage
from gateway.engine.sampling import SequenceSampler, select
from gateway.engine.step import PrefillChunk, StepModel, StepPlan
from gateway.engine.top_tokens import top_tokens

Event = TokenDelta | StreamEnd | BaseException


@dataclass(eq=False)
class GenerationJob:
    """One request: `params.n` sequences over the same prompt."""

    prompt_ids: list[int]
    params: SamplingParams
    max_tokens: int
    emit: Callable[[GenerationJob, Event], None]
    keep_stop: bool = False  # the text ends with the matched stop sequence (TGI)
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
        n = job.params.n
        assert n <= len(self._free)
        job.admitted_at = time.monotonic()
        for i in range(n):
            sampler = SequenceSampler(job.params, job.prompt_ids, self.vocab_size, seed_offset=i)
            text = TextAssembler(self.tokenizer, job.params.stop, job.keep_stop)
            job.sequences.append(_Sequence(job, i, heapq.heappop(self._free), sampler, text))
        job.live = n
        self.jobs.append(job)

    def drop(self, job: GenerationJob) -> None:
        """Remove a job (its client left, or it failed); its slots are free for the next step."""
        for seq in job.sequences:
            if not seq.done:
                seq.done = True
                heapq.heappush(self._free, seq.slot)
        job.live = 0
        self.jobs.remove(job)

    # one step --------------------------------------------------------------
    def plan(self) -> tuple[StepPlan, list[_Sequence], list[_Sequence]]:
        """The next step: every decoding sequence, then prompt chunks up to the budget."""
        plan = StepPlan()
        decoding: list[_Sequence] = []
        prefilling: list[_Sequence] = []
        budget = self.prefill_chunk
        for job in self.jobs:
            leader = job.sequences[0]
            if leader.prefilling:
                if budget <= 0:
                    continue
                chunk = job.prompt_ids[leader.prefilled : leader.prefilled + budget]
                last = leader.prefilled + len(chunk) == len(job.prompt_ids)
                plan.prefills.append(PrefillChunk(leader.slot, leader.prefilled, chunk, last))
                prefilling.append(leader)
                budget -= len(chunk)
                continue
            for seq in job.sequences:
                if not seq.done and seq.token is not None:
                    plan.decode_slots.append(seq.slot)
                    plan.decode_tokens.append(seq.token)
                    plan.decode_positions.append(seq.length)
                    decoding.append(seq)
        return plan, decoding, prefilling

    def step(self) -> int:
        """Run one forward pass and hand out its tokens; returns the sequences it served."""
        plan, decoding, prefilling = self.plan()
        if not plan:
            return 0
        logits = self.step_model.forward(plan)
        rows: list[int] = []
        chosen: list[_Sequence] = []
        for row, seq in enumerate(decoding):
            seq.length += 1
            rows.append(row)
            chosen.append(seq)
        row = len(decoding)
        for leader, chunk in zip(prefilling, plan.prefills, strict=True):
            leader.prefilled += len(chunk.tokens)
            leader.length = leader.prefilled
            if not chunk.last:
                continue
            for seq in leader.job.sequences:  # siblings share the prompt's cache and its logits
                if seq is not leader:
                    self.step_model.copy_slot(leader.slot, seq.slot, leader.length)
                    seq.prefilled = seq.length = leader.length
                rows.append(row)
                chosen.append(seq)
            row += 1
        if chosen:
            self._hand_out(logits, rows, chosen)
        return len(plan.decode_tokens) + len(plan.prefills)

    def _hand_out(self, logits: torch.Tensor, rows: list[int], chosen: list[_Sequence]) -> None:
        picked = logits if rows == list(range(logits.shape[0])) else logits[rows]
        tokens, logprobs = select(picked, [seq.sampler for seq in chosen])
        for i, seq in enumerate(chosen):
            top_n = seq.job.params.top_n
            top = top_tokens(picked[i], top_n, self.tokenizer, self.vocab_size) if top_n else ()
            self._advance(seq, tokens[i], logprobs[i], top)

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

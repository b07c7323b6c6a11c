"""Continuous batching: which sequences share each forward pass.

Runs on the engine's compute thread only (no locks, no asyncio). Requests join the
running batch between steps and leave it when they finish; each step feeds one
token per decoding sequence plus at most `prefill_chunk` prompt tokens, so a long
new prompt is prefilled over several steps instead of stalling every stream. A
request with n > 1 choices prefills its prompt once and copies the cached prompt
to its other sequences' slots. With the prefix cache (`prefix_cache.py`), a request's longest
cached prompt prefix is copied into its slot before its first chunk, and only the rest is
prefilled; each chunk's and each finished sequence's full blocks are kept for later requests.

A step is `plan()` (who takes part), `forward()` (the pass, and the cache positions
and logits rows it fills) and the output processor (`output.py`: tokens, text, events),
whose finished sequences give their slots back here.

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
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import torch

from gateway.detokenize import TextAssembler
from gateway.engine.generation.grammar import Constraint, GrammarCompiler, MaskWorker
from gateway.engine.generation.jobs import GenerationJob, Sequence
from gateway.engine.generation.output import OutputProcessor
from gateway.engine.generation.prefix_cache import PrefixCache
from gateway.engine.generation.sampling import SequenceSampler
from gateway.engine.generation.step import PrefillChunk, SlotKVCache, StepModel, StepPlan
from gateway.engine.runtime.observer import EngineObserver, NoObserver

log = logging.getLogger(__name__)

# one forward call's share of a step: its logits, the row each sequence samples from, those sequences
Pass = tuple[torch.Tensor, list[int], list[Sequence]]


@dataclass(eq=False)
class _Part:
    """One job's share of a step: its decoding sequences, or its leader's next prompt chunk."""

    job: GenerationJob
    decoding: list[Sequence] = field(default_factory=list)
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


def _constraints(parts: list[_Part]) -> list[Constraint]:
    """The grammars of the sequences that sample in this step."""
    found = []
    for part in parts:
        sequences = part.decoding if part.chunk is None else part.job.sequences if part.chunk.last else []
        found += [seq.sampler.constraint for seq in sequences if seq.sampler.constraint is not None]
    return found


class Scheduler:
    def __init__(
        self,
        step: StepModel,
        tokenizer: Any,
        *,
        slots: int,
        prefill_chunk: int,
        eos_ids: Iterable[int],
        prefix_tokens: int = 0,
    ) -> None:
        self.step_model = step
        self.tokenizer = tokenizer
        self.prefill_chunk = prefill_chunk
        self.eos_ids = frozenset(eos_ids)
        self.vocab_size = step.vocab_size
        self._free = list(range(slots))
        heapq.heapify(self._free)  # lowest slot first keeps the running slots dense
        self.jobs: list[GenerationJob] = []  # admitted, in admission order
        self.output = OutputProcessor(tokenizer, self.vocab_size, self.eos_ids, self.fail)
        self.grammars = GrammarCompiler(tokenizer, self.vocab_size, self.eos_ids)
        self.masks = MaskWorker()
        cache = getattr(step, "cache", None)
        # the prefix cache: at most `prefix_tokens` tokens' keys and values (0: off)
        self.prefix = (
            PrefixCache(cache, prefix_tokens) if prefix_tokens > 0 and isinstance(cache, SlotKVCache) else None
        )
        self.observer: EngineObserver = NoObserver()  # the engine's, set by it

    # admission -------------------------------------------------------------
    def free_slots(self) -> int:
        return len(self._free)

    def admit(self, job: GenerationJob) -> None:
        """Give `job` its slots; raises (holding nothing) if its sampler or detokeniser cannot be built."""
        n = job.params.n
        assert n <= len(self._free)
        grammar = job.params.grammar
        samplers = [
            SequenceSampler(
                job.params,
                job.prompt_ids,
                self.vocab_size,
                seed_offset=i,
                constraint=self.grammars.constraint(grammar) if grammar is not None else None,
            )
            for i in range(n)
        ]
        texts = [TextAssembler(self.tokenizer, job.params.stop, job.keep_stop) for _ in range(n)]
        job.admitted_at = time.monotonic()
        for i in range(n):
            job.sequences.append(Sequence(job, i, heapq.heappop(self._free), samplers[i], texts[i]))
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
            job.request_id or "(no id)",
            during,
            type(error).__name__,
            error,
            exc_info=error,
        )
        self.drop(job)
        job.emit(job, error)

    # one step --------------------------------------------------------------
    def plan(self) -> list[_Part]:
        """The next step: every decoding sequence, then prompt chunks up to the budget."""
        parts: list[_Part] = []
        budget = self.prefill_chunk
        for job in list(self.jobs):  # (a job whose cached prefix fails to load leaves it)
            leader = job.sequences[0]
            if leader.prefilling:
                if budget <= 0 or (not job.looked_up and not self._reuse(job)):
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

    def _reuse(self, job: GenerationJob) -> bool:
        """Start `job` from its prompt's longest cached prefix, looked up as its first chunk is
        planned (so it finds what the requests ahead of it have prefilled meanwhile); False if
        copying it failed, which fails the job."""
        job.looked_up = True
        leader = job.sequences[0]
        if self.prefix is not None:
            try:
                job.cached = self.prefix.load(job.prompt_ids, leader.slot)
            except Exception as exc:
                self.fail(job, exc, "copying its cached prompt prefix")
                return False
            leader.prefilled = leader.length = job.cached
        self.observer.prefix_lookup(len(job.prompt_ids), job.cached)
        return True

    def _keep(self, tokens: list[int], slot: int) -> None:
        """Offer the prefix cache the blocks of `tokens`, whose keys and values `slot` holds; a
        failure costs future hits, never this request."""
        if self.prefix is None:
            return
        try:
            self.prefix.store(tokens, slot)
        except Exception:
            log.exception("keeping a prompt prefix in the cache failed; the cache is emptied")
            self.prefix.clear()

    def step(self) -> int:
        """Run one forward pass and hand out its tokens; returns the sequences it served."""
        parts = self.plan()
        if not parts:
            return 0
        # the constrained sequences' masks are computed while the forward pass runs
        masking = self.masks.start(_constraints(parts))
        passes = self.forward(parts)
        if masking is not None:
            masking.exception()  # wait; a mask that failed is computed again (and fails its job) in sampling
        for logits, rows, chosen in passes:
            if chosen:
                self._release(self.output.process(logits, rows, chosen))
        return sum(len(part.decoding) + (part.chunk is not None) for part in parts)

    def forward(self, parts: list[_Part]) -> list[Pass]:
        """The forward pass of `parts` (one call, or one per job after a failed call), with the
        step's tokens booked into their sequences' cache positions."""
        try:
            done = [(parts, self.step_model.forward(_plan_of(parts)))]
        except Exception as exc:
            done = self._forward_each(parts, exc)
        return [(logits, *self._rows(group)) for group, logits in done]

    def _forward_each(self, parts: list[_Part], error: Exception) -> list[tuple[list[_Part], torch.Tensor]]:
        """After a failed pass: each job's share alone; the jobs whose own pass fails are failed."""
        if len(parts) == 1:
            self.fail(parts[0].job, error, "running the forward pass")
            return []
        log.warning(
            "a forward pass of %d requests failed (%s: %s); running them one by one",
            len(parts),
            type(error).__name__,
            error,
        )
        done = []
        for part in parts:
            try:
                done.append(([part], self.step_model.forward(_plan_of([part]))))
            except Exception as exc:
                self.fail(part.job, exc, "running the forward pass")
        return done

    def _rows(self, parts: list[_Part]) -> tuple[list[int], list[Sequence]]:
        """Book the step's tokens into the sequences; which logits row each sequence samples from."""
        rows: list[int] = []
        chosen: list[Sequence] = []
        for part in parts:
            for seq in part.decoding:
                seq.fed.append(seq.token)  # type: ignore[arg-type]
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
            self._keep(part.job.prompt_ids[: leader.prefilled], leader.slot)
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

    def _release(self, finished: list[Sequence]) -> None:
        """Free the slots of finished sequences; a job whose last sequence finished leaves the batch."""
        for seq in finished:
            self._keep(seq.job.prompt_ids + seq.fed, seq.slot)  # the next turn resends this answer
            heapq.heappush(self._free, seq.slot)
            job = seq.job
            if job.live == 0 and job in self.jobs:  # (a job failed meanwhile has left already)
                self.jobs.remove(job)

    def fail_all(self, error: BaseException) -> None:
        for job in list(self.jobs):
            self.drop(job)
            job.emit(job, error)

"""A request inside the engine (GenerationJob) and each of its choices (Sequence): the state the
scheduler plans with and the output processor advances, on the compute thread only."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

from gateway.detokenize import TextAssembler
from gateway.domain import SamplingParams, StreamEnd, TokenDelta
from gateway.engine.generation.sampling import SequenceSampler

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
    cached: int = 0  # prompt tokens whose keys and values came from the prefix cache
    looked_up: bool = False  # the prefix cache has been asked (once, before the first chunk)
    live: int = 0  # sequences still generating
    sequences: list[Sequence] = field(default_factory=list)


class Sequence:
    """One choice of a job: its cache slot, sampler, text so far and where it stands."""

    __slots__ = ("job", "index", "slot", "sampler", "text", "prefilled", "length", "token", "fed", "produced", "done")

    def __init__(
        self, job: GenerationJob, index: int, slot: int, sampler: SequenceSampler, text: TextAssembler
    ) -> None:
        self.job, self.index, self.slot = job, index, slot
        self.sampler, self.text = sampler, text
        self.prefilled = 0  # prompt tokens in the cache (the first sequence of a job prefills for all)
        self.length = 0  # tokens in the cache
        self.token: int | None = None  # the next token to feed
        self.fed: list[int] = []  # the tokens fed after the prompt (their keys and values follow it in the slot)
        self.produced = 0
        self.done = False

    @property
    def prefilling(self) -> bool:
        return self.prefilled < len(self.job.prompt_ids)

"""Text generation engine: a compute thread running a decode loop per request.

Requests enter through a bounded queue (full -> Overloaded); the thread streams
TokenDelta events back to the event loop. A request whose consumer goes away is
flagged and the thread stops decoding it at the next step.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import DynamicCache

from gateway.domain import FinishReason, SamplingParams, StreamEnd, TokenDelta, Usage
from gateway.engine.detokenize import TextAssembler
from gateway.engine.sampling import SequenceSampler
from gateway.engine.top_tokens import top_tokens
from gateway.errors import BackendFailure, Overloaded

log = logging.getLogger(__name__)

_STOP_WORKER = object()


@dataclass
class GenerationJob:
    prompt_ids: list[int]
    params: SamplingParams
    max_tokens: int
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue[TokenDelta | StreamEnd | BaseException] = field(default_factory=asyncio.Queue)
    cancelled: threading.Event = field(default_factory=threading.Event)
    enqueued_at: float = field(default_factory=time.monotonic)

    def emit(self, event: TokenDelta | StreamEnd | BaseException) -> None:
        self.loop.call_soon_threadsafe(self.events.put_nowait, event)


class GenerationEngine:
    def __init__(self, model: Any, tokenizer: Any, device: torch.device, *, max_queue: int, name: str) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.device = device
        self.name = name
        self._jobs: queue.Queue[GenerationJob | object] = queue.Queue(maxsize=max_queue)
        self._max_queue = max_queue
        self.vocab_size = int(model.get_output_embeddings().weight.shape[0])
        eos = model.generation_config.eos_token_id
        eos_ids = set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
        if tokenizer.eos_token_id is not None:
            eos_ids.add(tokenizer.eos_token_id)
        self.eos_ids = frozenset(eos_ids)
        self.pad_id = next(iter(self.eos_ids), 0)
        self.running = 0
        self._seconds_per_token = 0.05  # refined as requests complete; feeds Retry-After
        self._thread = threading.Thread(target=self._work, name=f"generate:{name}", daemon=True)
        self._thread.start()

    # event-loop side -------------------------------------------------------
    def queue_depth(self) -> int:
        return self._jobs.qsize()

    async def stream(
        self, prompt_ids: list[int], params: SamplingParams, max_tokens: int
    ) -> AsyncIterator[TokenDelta | StreamEnd]:
        job = GenerationJob(prompt_ids, params, max_tokens, asyncio.get_running_loop())
        try:
            self._jobs.put_nowait(job)
        except queue.Full:
            wait = (self.queue_depth() + 1) * max_tokens * self._seconds_per_token
            raise Overloaded(
                f"Model '{self.name}' has {self._max_queue} requests waiting; try again later.", retry_after=wait
            ) from None
        try:
            while True:
                event = await job.events.get()
                if isinstance(event, BaseException):
                    raise BackendFailure(f"Generation failed: {event}") from event
                yield event
                if isinstance(event, StreamEnd):
                    return
        finally:
            job.cancelled.set()

    def close(self) -> None:
        self._jobs.put(_STOP_WORKER)

    # compute-thread side ---------------------------------------------------
    def _work(self) -> None:
        while True:
            job = self._jobs.get()
            if job is _STOP_WORKER:
                return
            assert isinstance(job, GenerationJob)
            if job.cancelled.is_set():
                continue
            self.running += 1
            started = time.monotonic()
            try:
                produced = self._run(job)
                if produced:
                    spent = (time.monotonic() - started) / produced
                    self._seconds_per_token = 0.8 * self._seconds_per_token + 0.2 * spent
            except Exception as exc:  # reported to the request, the worker lives on
                log.exception("generation failed in %s", self.name)
                job.emit(exc)
            finally:
                self.running -= 1

    def _forward(self, input_ids: torch.Tensor, cache: Any) -> torch.Tensor:
        out = self.model(input_ids=input_ids.to(self.device), past_key_values=cache, use_cache=True)
        return out.logits[:, -1, :].float().cpu()

    @torch.inference_mode()
    def _run(self, job: GenerationJob) -> int:
        n = job.params.n
        samplers = [SequenceSampler(job.params, job.prompt_ids, self.vocab_size, seed_offset=i) for i in range(n)]
        texts = [TextAssembler(self.tokenizer, job.params.stop) for _ in range(n)]
        produced = [0] * n
        done = [False] * n
        cache = DynamicCache()
        logits = self._forward(torch.tensor([job.prompt_ids] * n), cache)
        while not job.cancelled.is_set():
            next_ids = []
            for i in range(n):
                if done[i]:
                    next_ids.append(self.pad_id)
                    continue
                token, logprob = samplers[i].choose(logits[i])
                samplers[i].observe(token)
                produced[i] += 1
                next_ids.append(token)
                finish = None
                if token in self.eos_ids:
                    text, finish, special = texts[i].flush(), FinishReason.EOS, True
                else:
                    text, special = texts[i].push(token), False
                    if texts[i].stopped:
                        finish = FinishReason.STOP
                    elif produced[i] >= job.max_tokens:
                        text, finish = text + texts[i].flush(), FinishReason.LENGTH
                done[i] = finish is not None
                top = top_tokens(logits[i], job.params.top_n, self.tokenizer, self.vocab_size)
                job.emit(TokenDelta(i, text, token, logprob, special, finish, top))
            if all(done):
                break
            logits = self._forward(torch.tensor(next_ids).unsqueeze(1), cache)
        job.emit(StreamEnd(Usage(prompt_tokens=len(job.prompt_ids), completion_tokens=sum(produced))))
        return max(produced)

"""The text generation engine: a bounded queue in front of continuous batching.

The event loop submits a request and reads its events. The device's compute thread
(`device.py`) runs the engine in ticks: each admits waiting requests into free batch
slots, runs one step (`scheduler.py`), hands the step's events back to the loop in
one call, and queues the next tick behind whatever other work the device has (an
embedding batch, another model's step). When the queue is full a request is refused
at once (`Overloaded`, with a Retry-After from the queue length and the measured
time a request holds a slot). A request whose consumer goes away leaves the queue at
once, or its slots before the next step.

A fault in one request fails that request only (see `scheduler.py`). An exception that
escapes a tick anyway is a fault of the engine itself: every request gets an error at once,
new ones are refused, and `on_failure` marks the model failed (/ready answers 503), rather
than leaving requests waiting on a loop that no longer runs.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Callable
from concurrent.futures import Executor
from dataclasses import dataclass
from typing import Any

import torch

from gateway.domain import Grammar, SamplingParams, StreamEnd, TokenDelta, TokenText
from gateway.engine.args import EngineArgs
from gateway.engine.generation.jobs import Event, GenerationJob
from gateway.engine.generation.scheduler import Scheduler
from gateway.engine.generation.step import PromptScores, StepModel
from gateway.engine.runtime.observer import EngineObserver
from gateway.errors import BackendFailure, GatewayError, InvalidRequest, ModelNotReady, Overloaded

log = logging.getLogger(__name__)


@dataclass(eq=False)
class _Stream:
    """The event-loop end of one request."""

    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue[Event]
    cancelled: bool = False


class GenerationEngine:
    def __init__(
        self,
        step: StepModel,
        tokenizer: Any,
        executor: Executor,
        *,
        eos_ids: frozenset[int],
        max_batch_size: int,
        max_queue: int,
        prefill_chunk: int,
        name: str,
        prefix_tokens: int = 0,
    ) -> None:
        self.name = name
        self.max_batch_size = max_batch_size
        self.max_queue = max_queue
        self.max_len = step.max_len
        self.scheduler = Scheduler(
            step,
            tokenizer,
            slots=max_batch_size,
            prefill_chunk=prefill_chunk,
            eos_ids=eos_ids,
            prefix_tokens=prefix_tokens,
        )
        self._executor = executor
        self._waiting: deque[GenerationJob] = deque()
        self._streams: dict[GenerationJob, _Stream] = {}
        self._lock = threading.Lock()
        self._ticking = False  # a tick is queued or running on the compute thread
        self._closing = False
        self._outbox: list[tuple[GenerationJob, Event]] = []
        self._job_seconds = 10.0  # a request's time in a slot, refined as requests finish (Retry-After)
        self.failure: str | None = None  # why the engine stopped, once it has
        self.on_failure: Callable[[str], None] | None = None  # told (on the compute thread) when it stops

    @property
    def observer(self) -> EngineObserver:
        return self.scheduler.observer  # the scheduler reports prefix cache lookups to it

    @observer.setter
    def observer(self, observer: EngineObserver) -> None:
        self.scheduler.observer = observer

    # event-loop side -------------------------------------------------------
    @property
    def running(self) -> int:
        """Requests holding batch slots."""
        return len(self.scheduler.jobs)

    def queue_depth(self) -> int:
        """Requests waiting for a slot."""
        return len(self._waiting)

    def retry_after(self) -> float:
        """Seconds until a slot is likely free for one more request: slots free up at
        `max_batch_size` per `_job_seconds`, and the queue is served first."""
        return (self.queue_depth() + 1) * self._job_seconds / self.max_batch_size

    async def stream(
        self,
        prompt_ids: list[int],
        params: SamplingParams,
        max_tokens: int,
        keep_stop: bool = False,
        request_id: str = "",
    ) -> AsyncIterator[TokenDelta | StreamEnd]:
        if params.n > self.max_batch_size:
            raise InvalidRequest(f"n={params.n} exceeds this model's batch size of {self.max_batch_size}.", param="n")
        stream = _Stream(asyncio.get_running_loop(), asyncio.Queue())
        job = GenerationJob(prompt_ids, params, max_tokens, self._emit, keep_stop, request_id=request_id)
        with self._lock:
            if self.failure is not None:
                raise self._failed_error()
            if len(self._waiting) >= self.max_queue or self._closing:
                raise Overloaded(
                    f"Model '{self.name}' has {len(self._waiting)} requests waiting; try again later.",
                    retry_after=self.retry_after(),
                )
            self._streams[job] = stream
            self._waiting.append(job)
            self._schedule_locked()
        try:
            while True:
                event = await stream.events.get()
                if isinstance(event, GatewayError):
                    raise event
                if isinstance(event, BaseException):
                    raise BackendFailure(f"Generation failed ({type(event).__name__}).") from event
                yield event
                if isinstance(event, StreamEnd):
                    return
        finally:
            stream.cancelled = True  # read by the compute thread before its next step
            self._withdraw(job)

    def _withdraw(self, job: GenerationJob) -> None:
        """A request still queued when its consumer leaves leaves the queue now, not when it
        reaches the front: abandoned requests must not hold up the ones behind them."""
        with self._lock:
            try:
                self._waiting.remove(job)
            except ValueError:  # admitted (dropped before the next step), finished or failed
                return
            self._streams.pop(job, None)

    def _failed_error(self) -> ModelNotReady:
        return ModelNotReady(f"Model '{self.name}' has failed and is not serving: {self.failure}")

    def compile_grammar(self, grammar: Grammar) -> None:
        """Compile (and cache) a request's grammar before it queues; raises GrammarError (a 400
        naming the field). Blocking: call it off the event loop."""
        self.scheduler.grammars.compile(grammar)

    async def score(self, tokens: list[int], top_n: int = 0) -> PromptScores:
        """Log-probabilities of a prompt's tokens (TGI's prefill details, OpenAI's echo) and the
        `top_n` most likely tokens at each position, computed on the device's thread between
        steps, beside the batch."""
        return await asyncio.wrap_future(self._executor.submit(self.scheduler.step_model.score, tokens, top_n))

    def token_text(self, token_id: int) -> TokenText:
        """A token's own text and exact bytes (OpenAI's logprobs), from the tokenizer's byte mapping."""
        return self.scheduler.output.pieces(token_id)

    def prefix_cache_blocks(self) -> tuple[int, int] | None:
        """The prefix cache's occupancy in blocks of 16 tokens: (held, most it may hold); None when off.
        Read from the event loop while the compute thread changes it: a dict's size, read atomically."""
        prefix = self.scheduler.prefix
        return None if prefix is None else (prefix.blocks, prefix.max_blocks)

    def kv_cache_bytes(self) -> int:
        """The KV cache's full reservation: every slot at its longest, and the prefix cache's pool at
        its largest (both grow up to it)."""
        cache = getattr(self.scheduler.step_model, "cache", None)
        if cache is None:
            return 0
        prefix = self.scheduler.prefix
        pool = prefix.bytes_reserved() if prefix is not None else 0
        return int(cache.bytes_per_token()) * self.max_batch_size * int(self.max_len) + pool

    def close(self) -> None:
        """Fail what is still queued or running and stop ticking; waits for the compute thread."""
        with self._lock:
            self._closing = True
        try:
            self._executor.submit(self._shut_down).result(timeout=60)
        except concurrent.futures.TimeoutError:  # the device is stuck in other work; the process is going away anyway
            log.warning("%s: the compute thread did not answer the shutdown within 60 s", self.name)

    # compute-thread side ---------------------------------------------------
    def _schedule_locked(self) -> None:
        if not self._ticking and not self._closing:
            self._ticking = True
            self._executor.submit(self._tick).add_done_callback(_log_escaped)

    def _tick(self) -> None:
        try:
            with torch.inference_mode():
                self._drop_cancelled()
                self._admit()
                started = time.perf_counter()
                try:
                    served = self.scheduler.step()  # a fault of one request fails only that one
                except Exception as exc:  # the scheduler's own bookkeeping: the batch fails, the engine lives on
                    log.exception("generation step failed in %s", self.name)
                    self.scheduler.fail_all(exc)
                    served = 0
                if served:
                    self.observer.stepped(served, time.perf_counter() - started)
                self._flush()
        except Exception as exc:
            self._stop(exc)
        finally:
            with self._lock:
                self._ticking = False
                if self.scheduler.jobs or self._waiting:
                    self._schedule_locked()

    def _emit(self, job: GenerationJob, event: Event) -> None:
        self._outbox.append((job, event))

    def _flush(self) -> None:
        """Hand the step's events to their event loops: one call per loop, not per token."""
        if not self._outbox:
            return
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[_Stream, Event]]] = {}
        for job, event in self._outbox:
            stream = self._streams.get(job)
            if stream is None:
                continue
            by_loop.setdefault(stream.loop, []).append((stream, event))
            if isinstance(event, (StreamEnd, BaseException)):
                del self._streams[job]
                if job.admitted_at:
                    held = time.monotonic() - job.admitted_at
                    self._job_seconds = 0.8 * self._job_seconds + 0.2 * held
        self._outbox.clear()
        for loop, items in by_loop.items():
            try:
                loop.call_soon_threadsafe(_deliver, items)
            except RuntimeError:  # that loop is closed: nobody is listening
                pass

    def _admit(self) -> None:
        scheduler = self.scheduler
        with self._lock:
            while self._waiting and scheduler.free_slots() >= self._waiting[0].params.n:
                job = self._waiting.popleft()
                stream = self._streams.get(job)
                if stream is None or stream.cancelled:
                    self._streams.pop(job, None)
                    continue
                try:
                    scheduler.admit(job)
                except Exception as exc:  # e.g. a seed its generator refuses: this request only
                    scheduler.fail(job, exc, "admitting it")
                    continue
                self.observer.queued(job.admitted_at - job.enqueued_at)

    def _drop_cancelled(self) -> None:
        for job in list(self.scheduler.jobs):
            stream = self._streams.get(job)
            if stream is None or stream.cancelled:
                self.scheduler.drop(job)
                self._streams.pop(job, None)

    def _stop(self, exc: Exception) -> None:
        """The engine's own loop failed: its state can no longer be trusted. Every request, running
        or waiting, gets an error now; new ones are refused; the backend is told."""
        self.failure = f"{type(exc).__name__}: {exc}"
        with self._lock:
            self._closing = True
            streams, self._streams = self._streams, {}
            self._waiting.clear()
        self._outbox.clear()
        log.critical(
            "the generation engine of %s stopped (%s); failing requests %s; the model is marked failed",
            self.name,
            self.failure,
            ", ".join(job.request_id or "(no id)" for job in streams) or "(none)",
            exc_info=exc,
        )
        for job in list(self.scheduler.jobs):
            with contextlib.suppress(Exception):
                self.scheduler.drop(job)
        self.scheduler.jobs.clear()
        for stream in streams.values():
            items: list[tuple[_Stream, Event]] = [(stream, self._failed_error())]
            with contextlib.suppress(RuntimeError):  # that loop is closed: nobody is listening
                stream.loop.call_soon_threadsafe(_deliver, items)
        if self.on_failure is not None:
            try:
                self.on_failure(self.failure)
            except Exception:
                log.exception("%s: reporting the engine's failure failed", self.name)

    def _shut_down(self) -> None:
        # a 503, not a 500: the model went away (unloaded after its drain timeout, or the server stops)
        error = ModelNotReady(f"Model '{self.name}' was unloaded before this request finished; retry it.")
        self.scheduler.fail_all(error)
        with self._lock:
            for job in self._waiting:
                self._emit(job, error)
            self._waiting.clear()
        self._flush()


def _deliver(items: list[tuple[_Stream, Event]]) -> None:
    for stream, event in items:
        stream.events.put_nowait(event)


def _log_escaped(future: concurrent.futures.Future[None]) -> None:
    """Nothing the compute thread raises goes unseen (a tick handles its exceptions; this is the net)."""
    if not future.cancelled() and (exc := future.exception()) is not None:
        log.critical("an exception escaped the generation engine's compute thread", exc_info=exc)


DEFAULT_MAX_TOTAL_TOKENS = 8192


def context_length(config: Any) -> int | None:
    for attr in ("max_position_embeddings", "n_positions", "max_sequence_length"):
        value = getattr(config, attr, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def _warm_up(step: StepModel) -> None:
    """One prefill and one decode step in slot 0: a model whose forward does not work with the
    slot cache fails here, at load time, and not on a user's request; the first request also
    finds the kernels ready."""
    from gateway.engine.generation.step import PrefillChunk, StepPlan

    with torch.inference_mode():
        step.forward(StepPlan(prefills=[PrefillChunk(0, 0, [0, 0], True)]))
        step.forward(StepPlan(decode_slots=[0], decode_tokens=[0], decode_positions=[2]))


def _compile(step: Any, name: str) -> None:
    seconds = step.compile_decode()
    if seconds is not None:
        log.info("%s: decode step compiled with torch.compile in %.1f s", name, seconds)


def create_engine(model: Any, tokenizer: Any, args: EngineArgs, name: str, executor: Executor) -> GenerationEngine:
    """The engine for a loaded causal LM: the fused step model where the architecture
    allows (and `args.fused`), else the model's own forward."""
    from gateway.engine.generation import fused_llama
    from gateway.engine.generation.hf_step import HFStepModel

    config = model.config
    limits = [context_length(config) or DEFAULT_MAX_TOTAL_TOKENS, args.max_total_tokens or DEFAULT_MAX_TOTAL_TOKENS]
    window = getattr(config, "sliding_window", None)
    if isinstance(window, int) and window > 0:
        limits.append(window)  # a sequence never outgrows the window, so full attention is exact
    max_len = min(limits)
    slots = args.max_batch_size
    if args.fused and fused_llama.supports(model):
        step: StepModel = fused_llama.FusedLlama(model, slots=slots, max_len=max_len)
        if args.compile:
            _compile(step, name)
    else:
        step = HFStepModel(model, slots=slots, max_len=max_len)
        if args.compile:
            log.info("%s: `compile` applies to the fused Llama-family path only; this model runs eagerly", name)
    eos = model.generation_config.eos_token_id
    eos_ids = set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
    if tokenizer.eos_token_id is not None:
        eos_ids.add(tokenizer.eos_token_id)
    _warm_up(step)
    # the prefix cache: by default a quarter of the tokens the slots can hold
    prefix = (args.prefix_cache_tokens or slots * max_len // 4) if args.prefix_cache else 0
    log.info(
        "%s: %s, %d slots of up to %d tokens, prefix cache of %d tokens",
        name,
        type(step).__name__,
        slots,
        max_len,
        prefix,
    )
    return GenerationEngine(
        step,
        tokenizer,
        executor,
        eos_ids=frozenset(eos_ids),
        max_batch_size=slots,
        max_queue=args.max_queue,
        prefill_chunk=args.prefill_chunk_tokens,
        name=name,
        prefix_tokens=prefix,
    )

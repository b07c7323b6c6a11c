"""No request can wedge the engine: faults injected (by monkeypatching) into a real engine on a tiny
Llama, driven through the real HTTP stack.

A fault in one request (admitting it, its forward pass, sampling, detokenising, top tokens) fails
that request only: its neighbours in the batch finish with the text they get alone, no slot is
leaked, the gauges go back to 0, and the next requests share forward passes as before. A fault of
the engine's own loop marks the model failed: /ready answers 503 naming it and every request gets
an error at once. A queued request whose client leaves leaves the queue at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest
import torch

from gateway.domain import SamplingParams
from gateway.engine.generation import output as output_module
from gateway.engine.generation import scheduler as scheduler_module
from gateway.engine.generation.sampling import SequenceSampler
from tests.engine.prom import model_samples
from tests.engine.test_continuous_batching import busy_device
from tests.helpers import LiveServer, settings_for

MODEL = "tiny4"
SLOTS = 4
NEIGHBOURS = ["hello world this is", "the quick brown fox", "one two three four"]
MAX_TOKENS = 12


def _local(folder: str, **backend: Any) -> dict[str, Any]:
    return {"kind": "local", "source": folder, "dtype": "float32", **backend}


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory: pytest.TempPathFactory) -> str:
    from tests.tiny_models import build_tiny_llama

    return str(build_tiny_llama(tmp_path_factory.mktemp("tiny-faults")))


@pytest.fixture(scope="module")
def server(tiny_folder: str) -> Iterator[LiveServer]:
    models = [
        {
            "name": MODEL,
            "task": "text-generation",
            "default": True,
            "backend": _local(tiny_folder, max_batch_size=SLOTS, max_queue=16),
        }
    ]
    with LiveServer(settings_for(models)) as live:
        live.wait_ready(120)
        yield live


def engine_of(live: LiveServer, model: str = MODEL) -> Any:
    return live.state.registry.lookup(model).backend.engine


def complete(
    live: LiveServer, body: dict[str, Any], *, path: str = "/v1/completions", request_id: str | None = None
) -> tuple[int, Any]:
    """One request; (status, JSON body) or, streamed, (status, the data lines)."""
    headers = {"x-request-id": request_id} if request_id else {}
    with httpx.stream("POST", f"{live.url}{path}", json=body, headers=headers, timeout=60) as resp:
        if body.get("stream"):
            return resp.status_code, [line[6:] for line in resp.iter_lines() if line.startswith("data: ")]
        resp.read()
        return resp.status_code, resp.json()


def greedy(prompt: str, **kw: Any) -> dict[str, Any]:
    return {"model": MODEL, "prompt": prompt, "max_tokens": MAX_TOKENS, "temperature": 0, **kw}


def streamed_text(lines: list[str]) -> str:
    return "".join(json.loads(line)["choices"][0]["text"] for line in lines if line != "[DONE]" and "choices" in line)


def run_together(live: LiveServer, calls: list[Callable[[], Any]]) -> list[Any]:
    """Queue every call behind a busy compute thread, so that they are admitted into one batch."""
    engine = engine_of(live)
    results: list[Any] = [None] * len(calls)

    def run(i: int) -> None:
        results[i] = calls[i]()

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(calls))]
    with busy_device():
        for t in threads:
            t.start()
        deadline = time.monotonic() + 20  # only a guard against a hang
        while engine.queue_depth() < len(calls):
            assert time.monotonic() < deadline, "the requests never reached the queue"
            time.sleep(0.01)
    for t in threads:
        t.join(60)
    return results


@contextlib.contextmanager
def counting_forwards(live: LiveServer) -> Iterator[list[int]]:
    step_model = engine_of(live).scheduler.step_model
    forward = step_model.forward
    count = [0]

    def counted(plan):  # noqa: ANN001, ANN202
        count[0] += 1
        return forward(plan)

    step_model.forward = counted
    try:
        yield count
    finally:
        step_model.forward = forward


def round_of_neighbours(live: LiveServer) -> tuple[list[str], int]:
    """The neighbours together, one of them streamed: their texts and the forward passes they took."""
    calls = [lambda p=p: complete(live, greedy(p)) for p in NEIGHBOURS[:-1]]
    calls.append(lambda: complete(live, greedy(NEIGHBOURS[-1], stream=True)))
    with counting_forwards(live) as forwards:
        results = run_together(live, calls)
    assert all(status == 200 for status, _ in results)
    texts = [body["choices"][0]["text"] for _, body in results[:-1]] + [streamed_text(results[-1][1])]
    return texts, forwards[0]


@pytest.fixture(scope="module")
def baseline(server: LiveServer) -> dict[str, Any]:
    alone = [complete(server, greedy(p))[1]["choices"][0]["text"] for p in NEIGHBOURS]
    round_of_neighbours(server)  # warm
    texts, forwards = round_of_neighbours(server)
    assert texts == alone
    return {"alone": alone, "forwards": forwards}


def assert_engine_idle(live: LiveServer, model: str = MODEL, slots: int = SLOTS) -> None:
    engine = engine_of(live, model)
    deadline = time.monotonic() + 20  # only a guard against a hang: a leaked request never leaves
    while engine.running or engine.queue_depth():
        assert time.monotonic() < deadline, "the engine never went idle"
        time.sleep(0.01)
    assert engine.scheduler.free_slots() == slots, "a slot leaked"
    samples = model_samples(live.url, model)
    assert samples["gateway_running_requests"] == 0 and samples["gateway_queue_depth"] == 0


# --- the faults -------------------------------------------------------------------------------
MARK_SEED = 424242  # the faulty request's seed, where the fault is keyed on sampling settings
MARK_STOP = "\u00a7\u00a7"  # the faulty request's stop sequence, where keyed on the detokeniser


def fault_admit(live: LiveServer, monkeypatch: pytest.MonkeyPatch) -> tuple[dict[str, Any], str]:
    """The second sampler of an n=2 request cannot be built (as `manual_seed` overflowed): the first
    one's slot must not leak."""

    def sampler(
        params: SamplingParams, prompt_ids: list[int], vocab: int, seed_offset: int = 0, **kwargs: Any
    ) -> SequenceSampler:
        if params.seed == MARK_SEED and seed_offset == 1:
            raise RuntimeError("Overflow when unpacking long")
        return SequenceSampler(params, prompt_ids, vocab, seed_offset, **kwargs)

    monkeypatch.setattr(scheduler_module, "SequenceSampler", sampler)
    return {
        "model": MODEL,
        "prompt": "paris is the",
        "max_tokens": 4,
        "n": 2,
        "temperature": 1,
        "seed": MARK_SEED,
    }, "/v1/completions"


POISON = 5  # a token id in the faulty prompt only


def fault_forward_prefill(live: LiveServer, monkeypatch: pytest.MonkeyPatch) -> tuple[dict[str, Any], str]:
    """Any forward pass that reads the poisoned prompt raises, as `F.embedding` did on an id
    outside the vocabulary: the batch's other requests are retried alone and go on."""
    step_model = engine_of(live).scheduler.step_model
    forward = step_model.forward

    def poisoned(plan):  # noqa: ANN001, ANN202
        if any(POISON in chunk.tokens for chunk in plan.prefills):
            raise IndexError("index out of range in self")
        return forward(plan)

    monkeypatch.setattr(step_model, "forward", poisoned)
    return {"model": MODEL, "prompt": [40, 41, POISON, 42], "max_tokens": 6}, "/v1/completions"


def fault_forward_decode(live: LiveServer, monkeypatch: pytest.MonkeyPatch) -> tuple[dict[str, Any], str]:
    """Mid-stream: once the poisoned request has two tokens, every pass that decodes it raises; the
    stream gets its tokens so far, then an error in-band."""
    step_model = engine_of(live).scheduler.step_model
    forward = step_model.forward
    armed: dict[int, int] = {}  # the poisoned request's slot -> its prompt length

    def poisoned(plan):  # noqa: ANN001, ANN202
        for chunk in plan.prefills:
            if POISON in chunk.tokens:
                armed[chunk.slot] = chunk.end
        hit = [
            i for i, slot in enumerate(plan.decode_slots) if plan.decode_positions[i] >= armed.get(slot, 1 << 30) + 1
        ]
        if hit:
            if len(plan.decode_slots) == 1 and not plan.prefills:
                armed.clear()  # failed alone: that request is gone, its slot is someone else's next
            raise RuntimeError("a kernel failed")
        return forward(plan)

    monkeypatch.setattr(step_model, "forward", poisoned)
    return {
        "model": MODEL,
        "prompt": [40, 41, POISON, 42],
        "max_tokens": 40,
        "stream": True,
        "temperature": 0,
    }, "/v1/completions"


def fault_sampling(live: LiveServer, monkeypatch: pytest.MonkeyPatch) -> tuple[dict[str, Any], str]:
    """Sampling the marked request's row raises: the step's vectorised draw fails, each row is then
    drawn alone, and only the marked request fails."""
    select = output_module.select

    def failing(logits, samplers):  # noqa: ANN001, ANN202
        if any(s.params.seed == MARK_SEED for s in samplers):
            raise ValueError("probability tensor contains either inf, nan or element < 0")
        return select(logits, samplers)

    monkeypatch.setattr(output_module, "select", failing)
    return {
        "model": MODEL,
        "prompt": "paris is the",
        "max_tokens": 6,
        "temperature": 0.8,
        "seed": MARK_SEED,
    }, "/v1/completions"


def fault_detokenize(live: LiveServer, monkeypatch: pytest.MonkeyPatch) -> tuple[dict[str, Any], str]:
    base = scheduler_module.TextAssembler

    class Failing(base):  # type: ignore[misc, valid-type]
        def push(self, token_id: int) -> str:
            if MARK_STOP in self._filter._stop and len(self._ids) >= 1:  # its second token
                raise UnicodeDecodeError("utf-8", b"\xff", 0, 1, "invalid start byte")
            return super().push(token_id)

    monkeypatch.setattr(scheduler_module, "TextAssembler", Failing)
    return {
        "model": MODEL,
        "prompt": "paris is the",
        "max_tokens": 8,
        "temperature": 0,
        "stop": [MARK_STOP],
        "stream": True,
    }, "/v1/completions"


def fault_top_tokens(live: LiveServer, monkeypatch: pytest.MonkeyPatch) -> tuple[dict[str, Any], str]:
    def failing(*args: Any) -> tuple:
        raise KeyError("a token the tokenizer cannot decode")

    monkeypatch.setattr(output_module, "top_tokens", failing)
    return {
        "inputs": "paris is the",
        "parameters": {"max_new_tokens": 4, "top_n_tokens": 2, "details": True},
    }, "/generate"


FAULTS = {
    "admit": fault_admit,
    "forward-prefill": fault_forward_prefill,
    "forward-decode": fault_forward_decode,
    "sampling": fault_sampling,
    "detokenize": fault_detokenize,
    "top-tokens": fault_top_tokens,
}


@pytest.mark.parametrize("where", list(FAULTS))
def test_a_fault_in_one_request_fails_that_request_only(
    server: LiveServer,
    baseline: dict[str, Any],
    where: str,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.ERROR, logger="gateway.engine")
    body, path = FAULTS[where](server, monkeypatch)
    request_id = f"faulty-{where}"
    calls = [lambda: complete(server, body, path=path, request_id=request_id)]
    calls += [lambda p=p: complete(server, greedy(p)) for p in NEIGHBOURS[:-1]]
    calls.append(lambda: complete(server, greedy(NEIGHBOURS[-1], stream=True)))
    started = time.monotonic()
    (status, faulty), *neighbours = run_together(server, calls)
    assert time.monotonic() - started < 30

    # the faulty request got an error in its API's shape: a status, or in-band once streaming
    if body.get("stream"):
        assert status == 200
        assert "error" in json.loads(faulty[-2]) and faulty[-1] == "[DONE]"
    else:
        assert status in (500, 503), faulty
        assert "error" in faulty
    # the request id is in the log, with the failure
    assert any(request_id in record.getMessage() for record in caplog.records), [r.getMessage() for r in caplog.records]

    # its neighbours got what they get alone
    texts = [b["choices"][0]["text"] for s, b in neighbours[:-1]] + [streamed_text(neighbours[-1][1])]
    assert [s for s, _ in neighbours] == [200] * len(NEIGHBOURS)
    assert neighbours[-1][1][-1] == "[DONE]"
    assert texts == baseline["alone"], (texts, baseline["alone"])
    assert_engine_idle(server)

    # and the next requests run as before: shared forward passes, no retries, no slot held. The count of
    # passes is the check (wall time against the baseline measured what else ran on the shared cores)
    texts, forwards = round_of_neighbours(server)
    assert texts == baseline["alone"]
    assert forwards == baseline["forwards"]  # the same passes: nothing left over (retries, a held slot)
    assert_engine_idle(server)


def test_forward_fault_mid_stream_delivers_the_tokens_before_it(
    server: LiveServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The poisoned stream gets the tokens it produced before its pass began to fail."""
    body, _ = fault_forward_decode(server, monkeypatch)
    status, lines = complete(server, body)
    assert status == 200 and lines[-1] == "[DONE]"
    error = json.loads(lines[-2])["error"]
    assert error["message"].startswith("Generation failed (RuntimeError)")
    tokens = [json.loads(line) for line in lines[:-2]]
    assert len(tokens) >= 1  # the prefill's token, and the first decode's (if not an end of sequence)
    assert_engine_idle(server)


# --- the queue --------------------------------------------------------------------------------
def test_a_cancelled_queued_request_leaves_the_queue_at_once(server: LiveServer) -> None:
    """Requests queued behind a busy device whose clients leave are gone from the queue while the
    device is still busy (not when they reach the front), and the one behind them is served."""
    engine = engine_of(server)

    async def queued(depth: int) -> None:
        deadline = time.monotonic() + 20  # only a guard against a hang
        while engine.queue_depth() < depth:
            assert time.monotonic() < deadline, f"{engine.queue_depth()} of {depth} requests queued"
            await asyncio.sleep(0.01)

    async def run() -> tuple[list[int], dict[str, Any]]:
        depths = []
        async with httpx.AsyncClient(base_url=server.url, timeout=60) as http:
            with busy_device():
                leaving = [
                    asyncio.create_task(http.post("/v1/completions", json=greedy(p, n=SLOTS))) for p in NEIGHBOURS * 2
                ]
                await queued(len(leaving))
                staying = asyncio.create_task(http.post("/v1/completions", json=greedy("paris is the")))
                await queued(len(leaving) + 1)
                depths.append(engine.queue_depth())
                for task in leaving:
                    task.cancel()
                # the device stays held (up to 30 s, and until this block ends), so a queue that drops to 1
                # within 10 s was left at once: requests dropped only on reaching the front would still be here
                deadline = time.monotonic() + 10
                while engine.queue_depth() > 1 and time.monotonic() < deadline:
                    await asyncio.sleep(0.01)
                depths.append(engine.queue_depth())
                depths.append(model_samples(server.url, MODEL)["gateway_queue_depth"])  # noqa: ASYNC210
            reply = await asyncio.wait_for(staying, 30)
        return depths, reply.json()

    depths, reply = asyncio.run(run())
    assert depths == [len(NEIGHBOURS) * 2 + 1, 1, 1]
    assert reply["choices"][0]["text"] and reply["usage"]["completion_tokens"] >= 1
    assert_engine_idle(server)


# --- the engine's own loop ----------------------------------------------------------------------
@pytest.fixture
def doomed(tiny_folder: str) -> Iterator[LiveServer]:
    models = [
        {"name": "doomed", "task": "text-generation", "backend": _local(tiny_folder, max_batch_size=1, max_queue=4)}
    ]
    with LiveServer(settings_for(models)) as live:
        live.wait_ready(120)
        yield live


def test_when_the_engine_loop_dies_the_model_is_failed_and_every_request_errs_at_once(
    doomed: LiveServer, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    engine = engine_of(doomed, "doomed")
    body = {"model": "doomed", "prompt": "the quick brown fox", "max_tokens": 30, "temperature": 0}
    alone = complete(doomed, body)[1]
    assert alone["usage"]["completion_tokens"] >= 3, "a prompt that runs a few steps is needed"
    flush, flushes = engine._flush, [0]

    def failing_flush() -> None:
        flushes[0] += 1
        if flushes[0] == 3:  # the running stream has its first tokens, the other request waits
            raise AttributeError("a bug in the engine's own loop")
        flush()

    monkeypatch.setattr(engine, "_flush", failing_flush)
    caplog.set_level(logging.CRITICAL, logger="gateway.engine")
    results: list[Any] = [None, None]
    threads = [
        threading.Thread(target=lambda: results.__setitem__(0, complete(doomed, {**body, "stream": True}))),
        threading.Thread(target=lambda: results.__setitem__(1, complete(doomed, body, request_id="the-waiting-one"))),
    ]
    started = time.monotonic()
    with busy_device():
        threads[0].start()
        while engine.queue_depth() < 1:
            time.sleep(0.01)
        threads[1].start()
        while engine.queue_depth() < 2:
            time.sleep(0.01)
    for t in threads:
        t.join(30)
    assert time.monotonic() - started < 25  # a hang would wait out the clients' timeouts
    (stream_status, lines), (status, waiting) = results
    assert stream_status == 200 and lines[-1] == "[DONE]"
    assert streamed_text(lines)  # it was running: its first tokens came
    assert "has failed" in json.loads(lines[-2])["error"]["message"]
    assert status == 503 and "has failed" in waiting["error"]["message"]
    assert any("doomed" in r.getMessage() and "the-waiting-one" in r.getMessage() for r in caplog.records)

    ready = httpx.get(f"{doomed.url}/ready")
    assert ready.status_code == 503
    assert ready.json()["status"] == "failed" and "AttributeError" in ready.json()["failed"]["doomed"]
    assert ready.json()["models"]["doomed"] == "failed"
    before = time.monotonic()
    status, reply = complete(doomed, body)  # a new request: an error at once, not a hang
    assert status == 503 and "has failed" in reply["error"]["message"]
    assert time.monotonic() - before < 10  # a hang would wait out the client's timeout
    hf = httpx.post(f"{doomed.url}/models/doomed", json={"inputs": "hello"}, timeout=5)
    assert hf.status_code == 503
    assert engine.running == 0 and engine.queue_depth() == 0


def test_an_exception_that_escapes_a_tick_is_logged(caplog: pytest.LogCaptureFixture) -> None:
    """The last net: a BaseException past the tick's own handling is logged, not lost in a future."""
    from concurrent.futures import Future

    from gateway.engine.generation.engine import _log_escaped

    caplog.set_level(logging.CRITICAL, logger="gateway.engine")
    future: Future[None] = Future()
    future.set_exception(SystemError("escaped"))
    _log_escaped(future)
    assert any(r.exc_info and isinstance(r.exc_info[1], SystemError) for r in caplog.records)


# --- seeds --------------------------------------------------------------------------------------
def test_seeds_wrap_instead_of_overflowing() -> None:
    """Seed + choice index past 2**64 wraps (torch reads negatives as their two's complement, too)."""

    def draws(seed: int, offset: int = 0) -> torch.Tensor:
        params = SamplingParams(temperature=1.0, seed=seed)
        return torch.rand(4, generator=SequenceSampler(params, [], 10, seed_offset=offset).generator)

    assert torch.equal(draws(2**64 - 1, offset=1), draws(0))
    assert torch.equal(draws(2**64 - 1, offset=3), draws(2))
    assert torch.equal(draws(2**64 + 5), draws(5))
    assert torch.equal(draws(-1), draws(2**64 - 1))

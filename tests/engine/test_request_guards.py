"""Requests that must not wedge the engine, through the real HTTP stack on a tiny random Llama:
out-of-range seeds, prompts of unknown token IDs beside running streams, clients that leave
mid-generation on every route, and prompts megabytes long."""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest
from huggingface_hub import InferenceClient
from huggingface_hub.errors import ValidationError

from gateway.engine.runtime.prompt_limits import text_bound
from tests.engine.test_continuous_batching import busy_device
from tests.helpers import LiveServer, settings_for, wait_until
from tests.tiny_models import build_tiny_llama

MODEL = "tiny"
CONTEXT = 4096
CHAT = [{"role": "user", "content": "hello world"}]


def never_ending(model, tokenizer) -> None:  # noqa: ANN001
    """Pin the end-of-sequence logit far below every other, so a generation never ends on its own.
    Feature 0 of the residual stream is 1 at every position and nothing writes to it, so after the
    final norm it is positive; only the end-of-sequence row reads it, negatively."""
    model.model.embed_tokens.weight[:, 0] = 1.0
    for layer in model.model.layers:
        layer.self_attn.o_proj.weight[0] = 0.0
        layer.mlp.down_proj.weight[0] = 0.0
    model.lm_head.weight[:, 0] = 0.0
    model.lm_head.weight[tokenizer.eos_token_id, 0] = -100.0


def build_long_tiny_llama(folder: Path) -> Path:
    """A 2-layer random Llama with a 4096-token context that never ends a generation on its own."""
    return build_tiny_llama(folder, context=CONTEXT, adjust=never_ending)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    folder = build_long_tiny_llama(tmp_path_factory.mktemp("tiny-long-llama"))
    models = [
        {
            "name": MODEL,
            "task": "text-generation",
            "default": True,
            "backend": {
                "kind": "local",
                "source": str(folder),
                "dtype": "float32",
                "device": "cpu",
                "max_batch_size": 4,
            },
        }
    ]
    settings = settings_for(models)
    settings.cache_dir = Path(tmp_path_factory.mktemp("cache"))
    with LiveServer(settings) as live:
        live.wait_ready(120)
        yield live


def engine(server: LiveServer):  # noqa: ANN201
    return server.state.registry.lookup(MODEL).backend.engine


def idle(server: LiveServer, within: float) -> bool:
    """The engine holds no slot and queues nothing within `within` seconds."""
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        if engine(server).running == 0 and engine(server).queue_depth() == 0:
            return True
        time.sleep(0.01)
    return False


def queued(server: LiveServer, depth: int) -> None:
    wait_until(lambda: engine(server).queue_depth() >= depth, f"{depth} requests queued", interval=0.01)


def sdk(server: LiveServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="x", max_retries=0, timeout=60)


# seeds -----------------------------------------------------------------------------------
OUT_OF_RANGE = [2**63, 2**64, -(2**63) - 1, 18446744073709551616, 2**64 - 1, 2**80]


@pytest.mark.parametrize("seed", OUT_OF_RANGE)
def test_out_of_range_seed_is_openais_400_naming_seed(server: LiveServer, seed: int) -> None:
    client = sdk(server)
    with pytest.raises(openai.BadRequestError) as chat:
        client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=1, seed=seed, temperature=1)
    with pytest.raises(openai.BadRequestError) as completion:
        client.completions.create(model=MODEL, prompt="hello", max_tokens=1, seed=seed, n=2)
    for error in (chat.value, completion.value):
        assert error.status_code == 400 and error.param == "seed" and error.type == "invalid_request_error"
    under_model = httpx.post(  # the chat API under the HF model URL speaks OpenAI's errors too
        f"{server.url}/models/{MODEL}/v1/chat/completions",
        json={"model": MODEL, "messages": CHAT, "max_tokens": 1, "seed": seed},
        timeout=30,
    )
    assert under_model.status_code == 400 and under_model.json()["error"]["param"] == "seed"
    assert idle(server, 2)


@pytest.mark.parametrize("seed", OUT_OF_RANGE)
@pytest.mark.parametrize("path", ["/generate", "/generate_stream", "/", f"/models/{MODEL}"])
def test_out_of_range_seed_is_a_422_on_tgi_and_hf_routes(server: LiveServer, path: str, seed: int) -> None:
    # json.dumps writes Python's big ints exactly, as a client in any language may send them
    body = json.dumps({"inputs": "hello", "parameters": {"max_new_tokens": 2, "do_sample": True, "seed": seed}})
    reply = httpx.post(server.url + path, content=body, headers={"content-type": "application/json"}, timeout=30)
    assert reply.status_code == 422, reply.text
    assert reply.json()["error_type"] == "validation" and "seed" in reply.json()["error"]
    assert idle(server, 2)


def test_hf_client_gets_the_seed_refused(server: LiveServer) -> None:
    client = InferenceClient(model=f"{server.url}/models/{MODEL}", token="x")
    with pytest.raises(ValidationError, match="parameters.seed"):  # the client's class for TGI's 422
        client.text_generation("hello", max_new_tokens=2, do_sample=True, seed=2**63)


def test_extreme_valid_seeds_answer_with_n_2(server: LiveServer) -> None:
    client = sdk(server)
    for seed in (2**63 - 1, -(2**63)):
        chat = client.chat.completions.create(
            model=MODEL, messages=CHAT, max_tokens=3, seed=seed, n=2, temperature=1, timeout=30
        )
        assert [c.finish_reason for c in chat.choices] == ["length", "length"]
        completion = client.completions.create(model=MODEL, prompt="hello", max_tokens=3, seed=seed, n=2, timeout=30)
        assert len(completion.choices) == 2
    for path in ("/generate", f"/models/{MODEL}"):
        reply = httpx.post(
            server.url + path,
            json={
                "inputs": "hello",
                "parameters": {"max_new_tokens": 3, "do_sample": True, "seed": 2**63 - 1, "details": True},
            },
            timeout=30,
        )
        assert reply.status_code == 200, reply.text
    assert idle(server, 2)


# token IDs -------------------------------------------------------------------------------
def test_unknown_token_ids_are_refused_on_arrival_and_neighbours_run_on(
    server: LiveServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    vocab = server.state.registry.lookup(MODEL).backend.vocab_rows
    poisons = [[999999999], [5, -1], [vocab], [[3, 4], [2**70]], [[1, 2], [7, vocab + 5]]]
    # The device is stopped in the first pass that decodes all three neighbours, until the poisoned
    # requests have their answers: the neighbours are mid-stream whatever the speed of the machine,
    # and a refusal that waited for the device (not given on arrival) would time out.
    step_model = engine(server).scheduler.step_model
    forward, held, release = step_model.forward, threading.Event(), threading.Event()

    def gated(plan):  # noqa: ANN001, ANN202
        if len(plan.decode_slots) == 3 and not held.is_set():
            held.set()
            release.wait(60)
        return forward(plan)

    monkeypatch.setattr(step_model, "forward", gated)

    async def run() -> None:
        client = openai.AsyncOpenAI(base_url=f"{server.url}/v1", api_key="x", max_retries=0, timeout=120)

        async def neighbour(prompt: list[int]) -> tuple[int, str | None, int]:
            stream = await client.completions.create(
                model=MODEL,
                prompt=prompt,
                max_tokens=400,
                temperature=0,
                stream=True,
                stream_options={"include_usage": True},
            )
            pieces, finish, used = 0, None, 0
            async for chunk in stream:
                if chunk.choices:
                    pieces += 1
                    finish = chunk.choices[0].finish_reason or finish
                if chunk.usage:
                    used = chunk.usage.completion_tokens
            return pieces, finish, used

        with busy_device():  # the neighbours are admitted together once all three are queued
            running = [asyncio.create_task(neighbour([5 + i, 6, 7])) for i in range(3)]
            await asyncio.to_thread(queued, server, 3)
        try:
            assert await asyncio.to_thread(held.wait, 30), "the three neighbours never decoded together"
            assert engine(server).running == 3
            for poison in poisons:
                with pytest.raises(openai.BadRequestError) as info:
                    await client.completions.create(model=MODEL, prompt=poison, max_tokens=5, timeout=15)
                assert info.value.param == "prompt" and "vocabulary" in info.value.message
            assert not any(task.done() for task in running)
        finally:
            release.set()
        for pieces, finish, used in await asyncio.gather(*running):
            assert finish == "length" and used == 400 and pieces > 0

    asyncio.run(run())
    assert idle(server, 2)


# clients that leave ----------------------------------------------------------------------
LONG = 4000  # tokens asked; each step is slowed to 5 ms, so 20 s of work if the request were kept
ROUTES = [
    ("/v1/chat/completions", {"model": MODEL, "messages": CHAT, "max_tokens": LONG, "temperature": 0}),
    ("/v1/chat/completions", {"model": MODEL, "messages": CHAT, "max_tokens": LONG, "stream": True}),
    ("/v1/completions", {"model": MODEL, "prompt": "hello", "max_tokens": LONG}),
    ("/v1/completions", {"model": MODEL, "prompt": ["hello", "world"], "max_tokens": LONG}),
    ("/v1/completions", {"model": MODEL, "prompt": "hello", "max_tokens": LONG, "stream": True}),
    ("/", {"inputs": "hello", "parameters": {"max_new_tokens": LONG}}),
    ("/", {"inputs": "hello", "parameters": {"max_new_tokens": LONG}, "stream": True}),
    ("/generate", {"inputs": "hello", "parameters": {"max_new_tokens": LONG}}),
    ("/generate_stream", {"inputs": "hello", "parameters": {"max_new_tokens": LONG}}),
    (f"/models/{MODEL}", {"inputs": "hello", "parameters": {"max_new_tokens": LONG}}),
    (f"/models/{MODEL}", {"inputs": ["hello", "world"], "parameters": {"max_new_tokens": LONG}}),
    (f"/models/{MODEL}", {"inputs": "hello", "parameters": {"max_new_tokens": LONG}, "stream": True}),
    (f"/models/{MODEL}/v1/chat/completions", {"model": MODEL, "messages": CHAT, "max_tokens": LONG}),
]


@pytest.mark.parametrize(("path", "body"), ROUTES, ids=[f"{p} {sorted(b)}" for p, b in ROUTES])
def test_a_client_that_leaves_frees_its_slots_on_every_route(
    server: LiveServer, monkeypatch: pytest.MonkeyPatch, path: str, body: dict[str, object]
) -> None:
    step_model = engine(server).scheduler.step_model
    forward = step_model.forward

    def slow(plan):  # noqa: ANN001, ANN202
        time.sleep(0.005)
        return forward(plan)

    monkeypatch.setattr(step_model, "forward", slow)
    data = json.dumps(body).encode()
    request = (
        f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\nContent-Length: {len(data)}\r\n\r\n"
    ).encode() + data
    given = body.get("prompt", body.get("inputs"))
    prompts = len(given) if isinstance(given, list) else 1
    with socket.create_connection(("127.0.0.1", server.port)) as sock:
        sock.sendall(request)
        deadline = time.monotonic() + 30
        while engine(server).running < prompts:
            assert time.monotonic() < deadline, "the generation never started"
            time.sleep(0.005)
        time.sleep(0.2)  # well into the generation
        assert engine(server).running == prompts
        sock.shutdown(socket.SHUT_RDWR)
    left = time.monotonic()
    assert idle(server, 2.0), f"the engine still ran {engine(server).running} request(s) 2 s after the client left"
    assert time.monotonic() - left < 2.0
    reply = httpx.post(f"{server.url}/generate", json={"inputs": "hi", "parameters": {"max_new_tokens": 2}}, timeout=30)
    assert reply.status_code == 200


# oversized prompts -----------------------------------------------------------------------
def rss_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def test_megabyte_prompts_are_refused_before_tokenizing_and_memory_stays_flat(server: LiveServer) -> None:
    """The server runs in this process, so this process's RSS is the server's (and the client's,
    which only keeps the same few bodies)."""
    text = "the quick brown fox jumps over the lazy dog " * 240_000  # 10.5 MB
    bodies = [
        ("/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": text}], "max_tokens": 1}),
        (
            "/v1/chat/completions",
            {
                "model": MODEL,
                "max_tokens": 1,
                "messages": [
                    {"role": "system", "content": text[: len(text) // 2]},
                    {"role": "user", "content": text[len(text) // 2 :]},
                ],
            },
        ),
        ("/v1/completions", {"model": MODEL, "prompt": text, "max_tokens": 1}),
        ("/generate", {"inputs": text, "parameters": {"max_new_tokens": 1}}),
        ("/generate_stream", {"inputs": text, "parameters": {"max_new_tokens": 1}}),
        (f"/models/{MODEL}", {"inputs": text, "parameters": {"max_new_tokens": 1}}),
    ]
    encoded = [(path, json.dumps(body).encode()) for path, body in bodies]
    del text, bodies
    with httpx.Client(timeout=60, headers={"content-type": "application/json"}) as client:

        def send(path: str, data: bytes) -> None:
            started = time.monotonic()
            reply = client.post(server.url + path, content=data)
            took = time.monotonic() - started
            assert reply.status_code in (400, 422), (path, reply.status_code, reply.text[:300])
            assert "characters" in reply.text and "tokens" in reply.text
            assert took < 3, f"{path} took {took:.1f} s to refuse"

        for path, data in encoded:  # the first round settles the allocator
            send(path, data)
        before = rss_bytes()
        for _ in range(2):  # twelve more, two per route
            for path, data in encoded:
                send(path, data)
        grown = rss_bytes() - before
    assert grown < 150 * 2**20, f"RSS grew by {grown / 2**20:.0f} MB over twelve refused prompts"
    assert idle(server, 2)


def test_the_character_bound_never_refuses_a_prompt_that_fits(server: LiveServer) -> None:
    backend = server.state.registry.lookup(MODEL).backend
    tokenizer, bound = backend.tokenizer, backend.text_bound
    assert bound is not None and bound == text_bound(tokenizer)
    # the vocabulary's longest pieces, repeated: the fewest tokens per character there is
    longest = sorted(range(len(tokenizer)), key=lambda i: -len(tokenizer.decode([i])))[:20]
    for token in longest:
        text = tokenizer.decode([token]) * 50
        assert len(text) <= bound.chars_per_token * len(tokenizer(text)["input_ids"])
    # a prompt just inside the bound, in characters, is left to the token count
    limit = backend._prompt_limit()
    text = "x" * (limit * bound.chars_per_token)
    reply = httpx.post(f"{server.url}/generate", json={"inputs": text, "parameters": {"max_new_tokens": 1}}, timeout=60)
    assert reply.status_code == 422 and "characters" not in reply.json()["error"]
    reply = httpx.post(
        f"{server.url}/generate", json={"inputs": text + "x", "parameters": {"max_new_tokens": 1}}, timeout=60
    )
    assert reply.status_code == 422 and "characters" in reply.json()["error"]
    # TGI's `truncate` keeps the end of any prompt: no bound then
    reply = httpx.post(
        f"{server.url}/generate",
        json={"inputs": text + "x", "parameters": {"max_new_tokens": 1, "truncate": 100}},
        timeout=60,
    )
    assert reply.status_code == 200, reply.text


def test_a_short_prompt_of_long_tokens_still_answers(server: LiveServer) -> None:
    reply = sdk(server).completions.create(model=MODEL, prompt="hello world " * 100, max_tokens=2)
    assert reply.choices[0].finish_reason == "length"

"""The prefix cache's occupancy gauge, `gateway_prefix_cache_blocks{model, state="used"|"capacity"}`,
read from /metrics of a live server with a tiny Llama (float32) served with its cache, with a cache of
two blocks, and without one; requests through the openai SDK move it."""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.helpers import LiveServer, settings_for
from tests.tiny_models import build_tiny_llama

BLOCK = 16
WORDS = "the quick brown fox jumps over the lazy dog hello world this is a tiny model for tests".split()


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    folder = build_tiny_llama(tmp_path_factory.mktemp("llama"))

    def spec(name: str, **backend: object) -> dict[str, object]:
        local = {"kind": "local", "source": str(folder), "dtype": "float32", "device": "cpu", **backend}
        return {"name": name, "task": "text-generation", "backend": {**local, "max_batch_size": 2}}

    models = [
        spec("big", prefix_cache_tokens=640),
        spec("small", prefix_cache_tokens=32),
        spec("off", prefix_cache=False),
    ]
    with LiveServer(settings_for(models)) as live:
        live.wait_ready()
        yield live


def blocks(server: LiveServer) -> dict[tuple[str, str], float]:
    """(model, state) -> value of every gateway_prefix_cache_blocks sample."""
    found = {}
    for family in text_string_to_metric_families(httpx.get(f"{server.url}/metrics").text):
        if family.name == "gateway_prefix_cache_blocks":
            for sample in family.samples:
                found[(sample.labels["model"], sample.labels["state"])] = sample.value
    return found


def ask(server: LiveServer, model: str, words: int, start: int = 0) -> tuple[int, int]:
    """A completion of a prompt of `words` words; its (prompt, completion) tokens."""
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="none")
    prompt = " ".join(WORDS[(start + i) % len(WORDS)] for i in range(words))
    answer = client.completions.create(model=model, prompt=prompt, max_tokens=8, temperature=0)
    assert answer.usage is not None
    return answer.usage.prompt_tokens, answer.usage.completion_tokens


def test_the_gauge_counts_the_blocks_held_up_to_the_capacity(server: LiveServer) -> None:
    before = blocks(server)
    assert before[("big", "capacity")] == 640 // BLOCK and before[("small", "capacity")] == 2
    assert before[("big", "used")] == 0 and before[("small", "used")] == 0
    assert not any(model == "off" for model, _ in before)  # no cache, no gauge

    prompt, completion = ask(server, "big", 40)
    used = blocks(server)[("big", "used")]
    # the prompt's and answer's full blocks (the answer's last token is never fed, an end token may not be)
    assert prompt // BLOCK <= used <= (prompt + completion) // BLOCK and used >= 2
    ask(server, "big", 40, start=3)  # another prompt from its first token: blocks of its own
    assert blocks(server)[("big", "used")] >= used + prompt // BLOCK - 1
    ask(server, "big", 40)  # the first prompt again: found, nothing new to hold beyond its answer
    again = blocks(server)[("big", "used")]

    for start in range(3):
        ask(server, "small", 40, start=start)
        assert blocks(server)[("small", "used")] == 2  # full, evicting
    assert blocks(server)[("big", "used")] == again

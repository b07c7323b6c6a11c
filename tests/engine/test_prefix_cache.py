"""Automatic prefix caching, on real engines over tiny random checkpoints in float32: a tiny Llama on
the fused path and a tiny GPT-2 on the generic path. Multi-turn conversations (the whole history
resent every turn) get exactly the greedy tokens they get without the cache, with the reused
tokens reported; so do a tiny cache that keeps evicting, requests sharing a prefix that join in
the same step, n > 1, grammar-constrained and logprobs requests."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from gateway.domain import Grammar, SamplingParams, StreamEnd, TokenDelta
from gateway.engine.args import EngineArgs
from gateway.engine.generation.engine import GenerationEngine, create_engine
from gateway.engine.generation.prefix_cache import BLOCK, PrefixCache
from gateway.engine.generation.step import SlotKVCache
from gateway.engine.runtime.device import device_worker
from gateway.engine.runtime.loader import load_model
from tests.tiny_models import build_tiny_llama, build_tokenizer

SYSTEM = list(range(3, 3 + 40))  # a "system prompt" of 40 tokens (2 full blocks and a half)
ANSWER = 6
SHARPNESS = 0.3


def _sharpen(model: Any, tokenizer: Any = None) -> None:
    """Weights large enough for sharp attention: with the usual tiny initialisation attention is
    nearly uniform, so the output hardly depends on which keys sit at which position, and a cache
    that scrambled them would go unnoticed."""
    torch.manual_seed(0)
    for name, param in model.named_parameters():
        if "norm" in name or "ln" in name:
            param.normal_(1, 0.2)
        else:
            param.normal_(0, SHARPNESS)


def _build(kind: str, folder: Path) -> Path:
    """A 2-layer model with sharpened weights: a Llama (fused path) or a GPT-2 (generic path)."""
    if kind != "gpt2":
        return build_tiny_llama(folder, adjust=_sharpen)
    import transformers as tf

    config = tf.GPT2Config(
        vocab_size=300, n_embd=64, n_layer=2, n_head=4, n_positions=256, bos_token_id=0, eos_token_id=0
    )
    model = tf.GPT2LMHeadModel(config)
    with torch.no_grad():
        _sharpen(model)
    model.save_pretrained(folder)
    build_tokenizer(folder)
    return folder


class Recorder:
    """An observer that keeps the prefix cache lookups."""

    def __init__(self) -> None:
        self.lookups: list[tuple[int, int]] = []

    def queued(self, seconds: float) -> None:
        return None

    def stepped(self, sequences: int, seconds: float) -> None:
        return None

    def prefix_lookup(self, prompt_tokens: int, cached_tokens: int) -> None:
        self.lookups.append((prompt_tokens, cached_tokens))


@pytest.fixture(scope="module", params=["llama", "gpt2"])
def engine(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[GenerationEngine]:
    from transformers import AutoModelForCausalLM

    folder = _build(request.param, tmp_path_factory.mktemp(request.param))
    args = EngineArgs(source=str(folder), dtype="float32", device="cpu", max_batch_size=6, prefill_chunk_tokens=32)
    tokenizer, model, _, _ = load_model(args, tmp_path_factory.mktemp("cache"), AutoModelForCausalLM)
    built = create_engine(model, tokenizer, args, f"tiny-{request.param}", device_worker("cpu"))
    kind = "FusedLlama" if request.param == "llama" else "HFStepModel"
    assert type(built.scheduler.step_model).__name__ == kind
    assert built.scheduler.prefix is not None  # on by default
    yield built
    built.close()


def with_cache(engine: GenerationEngine, tokens: int | None) -> Recorder:
    """A fresh prefix cache of `tokens` (None: off) on `engine`, and a recorder of its lookups."""
    cache = engine.scheduler.step_model.cache  # type: ignore[attr-defined]
    engine.scheduler.prefix = PrefixCache(cache, tokens) if tokens else None
    recorder = Recorder()
    engine.observer = recorder
    return recorder


def scramble(engine: GenerationEngine) -> None:
    """Noise in every slot of the idle engine (on its compute thread, between ticks): a request must
    not find its prefix in a slot because an earlier request left it there."""

    def fill() -> None:
        cache = engine.scheduler.step_model.cache  # type: ignore[attr-defined]
        for store in (cache.keys, cache.values):
            for tensor in store:
                tensor.normal_(0, 3)

    assert engine.running == 0
    device_worker("cpu").submit(fill).result()


async def generate(engine: GenerationEngine, prompt: list[int], **params: Any) -> tuple[list[list[int]], int]:
    """Each choice's tokens and the usage's cached tokens (call `scramble` first)."""
    sampling = SamplingParams(temperature=0.0, **params)
    choices: list[list[int]] = [[] for _ in range(sampling.n)]
    cached = -1
    async for event in engine.stream(prompt, sampling, ANSWER):
        if isinstance(event, TokenDelta):
            choices[event.index].append(event.token_id)  # type: ignore[arg-type]
        elif isinstance(event, StreamEnd):
            cached = event.usage.cached_tokens
    return choices, cached


def user_turn(conversation: int, turn: int) -> list[int]:
    return [200 + conversation, 100 + turn, 7, 8 + conversation % 3]


async def conversations(
    engine: GenerationEngine, count: int, turns: int
) -> tuple[list[list[int]], list[int], list[int]]:
    """`count` conversations of `turns` turns over the shared system prompt, run side by side (each
    turn of all conversations concurrently); every answer's tokens, its cached tokens and the cached
    tokens expected from the previous turn (its prompt and answer, less the answer's last token,
    which was never fed), in order."""
    histories = [list(SYSTEM) for _ in range(count)]
    answers: list[list[int]] = []
    cached: list[int] = []
    expected: list[int] = []
    for turn in range(turns):
        prompts = [history + user_turn(c, turn) for c, history in enumerate(histories)]
        if turn:
            fed = [len(history) - 1 - 1 for history in histories]  # less the end-of-turn and the last token
            expected += [min(n, len(p) - 1) // BLOCK * BLOCK for n, p in zip(fed, prompts, strict=True)]
        scramble(engine)
        results = await asyncio.gather(*(generate(engine, prompt) for prompt in prompts))
        for c, ((tokens,), hit) in enumerate(results):
            answers.append(tokens)
            cached.append(hit)
            histories[c] = prompts[c] + tokens + [2]  # the client resends the answer and an end-of-turn token
    return answers, cached, expected


def test_multi_turn_greedy_identical_with_and_without_the_cache(engine: GenerationEngine) -> None:
    with_cache(engine, None)
    expected, off, _ = asyncio.run(conversations(engine, 3, 4))
    assert off == [0] * len(off)  # a disabled cache reports nothing cached
    recorder = with_cache(engine, 4096)
    got, cached, reusable = asyncio.run(conversations(engine, 3, 4))
    assert got == expected
    # the first turns: the first is cold, the others meet what it prefilled before them (or not)
    assert cached[0] == 0 and set(cached[1:3]) <= {0, 32}, cached
    assert cached[3:] == reusable  # each later turn reuses its previous prompt and answer
    assert [hit for _, hit in recorder.lookups] == cached  # the metrics see what the usage says
    assert all(prompt > hit for prompt, hit in recorder.lookups)


def test_a_repeated_prompt_reuses_all_but_its_last_token(engine: GenerationEngine) -> None:
    with_cache(engine, 4096)
    prompt = SYSTEM[:32]  # exactly two blocks: the second can only be partly reused, so it is not
    runs = []
    for tokens in (prompt, prompt, SYSTEM[:33]):
        scramble(engine)
        runs.append(asyncio.run(generate(engine, tokens)))
    (first, cold), (again, warm), (third, hit) = runs
    assert (cold, warm, hit) == (0, BLOCK, 2 * BLOCK) and again == first
    with_cache(engine, None)
    scramble(engine)
    assert asyncio.run(generate(engine, SYSTEM[:33])) == (third, 0)


def test_eviction_under_a_tiny_budget_stays_correct(engine: GenerationEngine) -> None:
    with_cache(engine, None)
    expected, _, _ = asyncio.run(conversations(engine, 3, 3))
    with_cache(engine, 3 * BLOCK)  # three blocks: every turn evicts
    got, cached, _ = asyncio.run(conversations(engine, 3, 3))
    assert got == expected
    assert engine.scheduler.prefix is not None and engine.scheduler.prefix.blocks <= 3
    assert max(cached) <= 3 * BLOCK


def test_requests_sharing_a_prefix_admitted_together(engine: GenerationEngine) -> None:
    """Six requests over one long prefix join in the same step: the ones whose first chunk comes after
    another's reuse what it has prefilled so far; all get their tokens alone."""
    shared = SYSTEM + SYSTEM[::-1]  # 80 tokens: three prefill chunks of 32
    prompts = [shared + [50 + i, 60 + i] for i in range(6)]

    async def together() -> list[tuple[list[list[int]], int]]:
        return await asyncio.gather(*(generate(engine, p) for p in prompts))

    with_cache(engine, None)
    alone = []
    for prompt in prompts:
        scramble(engine)
        alone.append(asyncio.run(generate(engine, prompt))[0])
    with_cache(engine, 4096)
    scramble(engine)
    results = asyncio.run(together())
    assert [choices for choices, _ in results] == alone
    hits = [hit for _, hit in results]
    assert hits[0] == 0 and max(hits) >= 32, hits


def test_n_choices_grammar_and_logprobs_reuse_the_prefix(engine: GenerationEngine) -> None:
    prompt = SYSTEM + [9, 10, 11]
    grammar = Grammar(kind="regex", value="(hello|the|one)( [a-z]+){1,3}")
    cases: list[dict[str, Any]] = [
        {"n": 3, "temperature": 0.8, "seed": 5},
        {"grammar": grammar},
        {"logprobs": True, "top_n": 3},
    ]
    for params in cases:
        with_cache(engine, None)
        sampling = {"temperature": 0.0, **params}
        expected = asyncio.run(stream_all(engine, prompt, sampling))
        with_cache(engine, 4096)
        asyncio.run(stream_all(engine, prompt, sampling))  # fills the cache
        got = asyncio.run(stream_all(engine, prompt, sampling))
        assert got[1] == 32, params
        assert [e[:2] for e in got[0]] == [e[:2] for e in expected[0]], params
        for mine, theirs in zip(got[0], expected[0], strict=True):  # float32 rounding of another chunking
            assert mine[2] == pytest.approx(theirs[2], abs=1e-4)
            assert [t for t, _ in mine[3]] == [t for t, _ in theirs[3]]
            assert [p for _, p in mine[3]] == pytest.approx([p for _, p in theirs[3]], abs=1e-4)


async def stream_all(engine: GenerationEngine, prompt: list[int], sampling: dict[str, Any]) -> tuple[list[Any], int]:
    """Every token event (choice, token, logprob, top tokens) and the cached tokens."""
    scramble(engine)
    events: list[Any] = []
    cached = -1
    async for event in engine.stream(prompt, SamplingParams(**sampling), ANSWER):
        if isinstance(event, TokenDelta):
            events.append((event.index, event.token_id, event.logprob, [(t.token_id, t.logprob) for t in event.top]))
        elif isinstance(event, StreamEnd):
            cached = event.usage.cached_tokens
    return events, cached


def test_pool_keeps_exact_keys_and_evicts_leaves_first() -> None:
    """Blocks copied out of a slot come back bit for bit, into another slot; the least recently used
    chain goes first and a chain's root outlives its leaves."""
    torch.manual_seed(0)
    slots = SlotKVCache(layers=2, slots=3, kv_heads=2, head_dim=4, max_len=256, dtype=torch.float32, device="cpu")
    for store in (slots.keys, slots.values):
        for tensor in store:
            tensor.normal_()
    pool = PrefixCache(slots, 4 * BLOCK)
    a, b = list(range(100, 148)), list(range(200, 232))  # 3 blocks, 2 blocks
    assert pool.store(a, 0) == 3 and pool.store(b, 1) == 2  # the second evicts a's leaf, the LRU block
    assert pool.blocks == 4
    assert pool.load(a + [1], 2) == 2 * BLOCK  # a's root and middle survived, its leaf did not
    for store in (slots.keys, slots.values):
        for tensor in store:
            torch.testing.assert_close(tensor[2, :, : 2 * BLOCK], tensor[0, :, : 2 * BLOCK], rtol=0, atol=0)
    assert pool.load(b + [1], 2) == 2 * BLOCK
    assert pool.load([5] * 40, 2) == 0
    assert pool.store(a, 0) == 1  # only the missing leaf is copied again

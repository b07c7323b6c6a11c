"""The `compile` engine setting (gateway/engine/generation/compiled_step.py): a tiny Llama in float32
served twice through the real HTTP stack and the openai SDK, once with its decode step compiled by
torch.compile and once eager. Greedy answers, one request at a time (the one-row graph) and several
at once (the masked several-row graph), are the same tokens with the same log-probabilities, and the
compiled steps really ran the compiled graphs: none compiled again, none run eagerly by the "eager
on recompile" stance (counted apart: steps forced eager are seen as such). When compiling fails
(torch.compile raising, or the compiled step failing at run time) the model serves anyway, on the
eager step, with one warning.

Needs a C++ compiler (inductor writes C++): g++ is installed by .ci/run. Compiling the tiny model's
two graphs takes about 15-40 s on the 2-core development machine."""

from __future__ import annotations

import asyncio
import logging
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pytest
import torch

from gateway.domain import SamplingParams, TokenDelta
from gateway.engine.args import EngineArgs
from gateway.engine.generation.compiled_step import CompiledDecode
from gateway.engine.generation.engine import GenerationEngine, create_engine
from gateway.engine.generation.step import StepPlan
from gateway.engine.runtime.device import device_worker
from gateway.engine.runtime.loader import load_model
from tests.helpers import LiveServer, settings_for
from tests.tiny_models import build_tiny_llama

pytestmark = pytest.mark.skipif(shutil.which("g++") is None and shutil.which("c++") is None, reason="no C++ compiler")

EAGER, COMPILED = "tiny-eager", "tiny-compiled"
PROMPTS = ["hello world", "the quick brown fox", "paris is the capital of", "one two three four five six"]


def _sharpen(model: Any, tokenizer: Any = None) -> None:
    """Larger weights than the usual tiny initialisation: sharp attention and logits, so that a step
    that read the wrong keys or rows would change the greedy tokens."""
    torch.manual_seed(1)
    for name, param in model.named_parameters():
        if "norm" in name:
            param.normal_(1, 0.2)
        else:
            param.normal_(0, 0.3)


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_llama(tmp_path_factory.mktemp("llama"), adjust=_sharpen)


@pytest.fixture(scope="module")
def server(folder: Path) -> Iterator[LiveServer]:
    def spec(name: str, compile: bool) -> dict[str, object]:
        backend = {"kind": "local", "source": str(folder), "dtype": "float32", "device": "cpu", "compile": compile}
        return {"name": name, "task": "text-generation", "backend": {**backend, "max_batch_size": 4}}

    with LiveServer(settings_for([spec(EAGER, False), spec(COMPILED, True)])) as live:
        live.wait_ready()
        yield live


def _compiled(server: LiveServer) -> CompiledDecode:
    entry = next(e for e in server.state.registry.entries if e.spec.name == COMPILED)
    compiled = entry.backend.engine.scheduler.step_model.compiled
    assert isinstance(compiled, CompiledDecode) and compiled.enabled
    return compiled


async def _answers(server: LiveServer, model: str, together: bool) -> list[tuple[str, list[float]]]:
    client = openai.AsyncOpenAI(base_url=f"{server.url}/v1", api_key="none")

    async def one(prompt: str) -> tuple[str, list[float]]:
        answer = await client.completions.create(model=model, prompt=prompt, max_tokens=12, temperature=0, logprobs=1)
        choice = answer.choices[0]
        assert choice.logprobs is not None and choice.logprobs.token_logprobs is not None
        return choice.text, [p or 0.0 for p in choice.logprobs.token_logprobs]

    try:
        if together:
            return list(await asyncio.gather(*(one(p) for p in PROMPTS)))
        return [await one(p) for p in PROMPTS]
    finally:
        await client.close()


@pytest.mark.parametrize("together", [False, True], ids=["one-at-a-time", "concurrent"])
def test_compiled_decode_gives_the_eager_greedy_tokens(
    server: LiveServer, together: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    from torch._dynamo.utils import counters

    compiled = _compiled(server)
    assert compiled.compile_seconds > 0
    steps, eager, graphs = compiled.steps, compiled.eager_steps, counters["stats"]["unique_graphs"]
    expected = asyncio.run(_answers(server, EAGER, together))
    served = _watch(compiled, monkeypatch)
    got = asyncio.run(_answers(server, COMPILED, together))
    assert [text for text, _ in got] == [text for text, _ in expected]
    assert all(text for text, _ in got)
    for (_, mine), (_, theirs) in zip(got, expected, strict=True):
        assert mine == pytest.approx(theirs, abs=1e-4)
    # every decode-only step ran a compiled graph (11 a request alone): none compiled anew, none run
    # eagerly by the "eager on recompile" stance (`steps` counts only the graphs' runs)
    assert served and all(ran for _, ran in served), served
    assert compiled.steps - steps == len(served) and compiled.eager_steps == eager
    assert counters["stats"]["unique_graphs"] == graphs
    if together:  # the several-row graph served steps of more rows than the warm-up's two
        assert max(rows for rows, _ in served) > 2, served
    else:
        assert len(served) >= len(PROMPTS) * 10 and {rows for rows, _ in served} == {1}


def _watch(compiled: CompiledDecode, monkeypatch: pytest.MonkeyPatch) -> list[tuple[int, bool]]:
    """(rows, whether a compiled graph ran it) of each step the compiled decode takes from now on."""
    served: list[tuple[int, bool]] = []
    run = compiled.run

    def watched(plan: StepPlan, *, warming: bool = False) -> torch.Tensor | None:
        before = compiled.steps
        out = run(plan, warming=warming)
        if out is not None:
            served.append((len(plan.decode_slots), compiled.steps > before))
        return out

    monkeypatch.setattr(compiled, "run", watched)
    return served


def test_steps_that_fit_no_compiled_graph_run_eagerly_and_are_counted(
    server: LiveServer, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A step the stance runs eagerly (here every step: "force_eager" where the engine asks for "eager
    on recompile") gets the eager model's answer and is counted as eager, not compiled, with one warning."""
    compiled = _compiled(server)
    steps, eager = compiled.steps, compiled.eager_steps
    expected = asyncio.run(_answers(server, EAGER, False))
    stance = torch.compiler.set_stance
    monkeypatch.setattr(torch.compiler, "set_stance", lambda *args, **kwargs: stance("force_eager"))
    with caplog.at_level(logging.WARNING):
        got = asyncio.run(_answers(server, COMPILED, False))
    monkeypatch.undo()
    assert [text for text, _ in got] == [text for text, _ in expected]
    assert compiled.steps == steps
    assert compiled.eager_steps - eager >= len(PROMPTS) * 10
    assert caplog.text.count("fitted none of the compiled graphs") == (0 if eager else 1)
    assert compiled.enabled


def _engine(folder: Path, cache: Path) -> GenerationEngine:
    from transformers import AutoModelForCausalLM

    args = EngineArgs(source=str(folder), dtype="float32", device="cpu", max_batch_size=2, compile=True)
    tokenizer, model, _, _ = load_model(args, cache, AutoModelForCausalLM)
    return create_engine(model, tokenizer, args, "tiny", device_worker("cpu"))


async def _greedy(engine: GenerationEngine, prompt: list[int]) -> list[int]:
    tokens = []
    async for event in engine.stream(prompt, SamplingParams(temperature=0.0), 8):
        if isinstance(event, TokenDelta):
            tokens.append(event.token_id)
    return tokens  # type: ignore[return-value]


@pytest.mark.parametrize("where", ["torch.compile", "first graph"])
def test_a_model_whose_compile_fails_serves_eagerly(
    folder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, where: str
) -> None:
    """torch.compile itself raising, or the first graph failing to compile at load (what inductor does
    without a C++ compiler): the model loads and serves on the eager step."""

    def refuse(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("no compiler here")

    monkeypatch.setattr(torch, "compile", refuse if where == "torch.compile" else lambda module, **kw: refuse)
    with caplog.at_level(logging.WARNING):
        engine = _engine(folder, tmp_path)
    try:
        assert engine.scheduler.step_model.compiled is None  # type: ignore[attr-defined]
        assert "no compiler here" in caplog.text
        assert len(asyncio.run(_greedy(engine, [5, 6, 7]))) == 8
    finally:
        engine.close()


def test_a_compiled_step_failing_at_run_time_falls_back_once(
    folder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Inductor failing while serving (here: the compiled function raising) turns the compiled step
    off with one warning; the request in flight and the later ones get the eager step's tokens."""

    class Broken:
        """Compiles (at load: what it returns is overwritten by the eager warm-up's prefill), then fails."""

        failing = False

        def __init__(self, module: Any, **kwargs: Any) -> None:
            self.calls = 0

        def __call__(self, *args: Any) -> Any:
            if not Broken.failing:
                return torch.zeros(len(args[0]), 64)
            self.calls += 1
            raise RuntimeError("inductor fell over")

    monkeypatch.setattr(torch, "compile", Broken)
    engine = _engine(folder, tmp_path)
    try:
        step = engine.scheduler.step_model
        compiled = step.compiled  # type: ignore[attr-defined]
        assert compiled is not None and compiled.enabled
        Broken.failing = True
        with caplog.at_level(logging.WARNING):
            first = asyncio.run(_greedy(engine, [5, 6, 7]))
            second = asyncio.run(_greedy(engine, [5, 6, 7]))
        assert not compiled.enabled and compiled.function.calls == 1
        assert caplog.text.count("inductor fell over") == 1
        step.compiled = None  # type: ignore[attr-defined]
        assert first == second == asyncio.run(_greedy(engine, [5, 6, 7]))
    finally:
        engine.close()

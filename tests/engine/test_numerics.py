"""Numerics of the default chat model (SmolLM2-135M-Instruct, loaded by the real loading code) on a
dozen chat prompts, each path against float32.

For every prompt the fused float32 path's 20-token greedy continuation is computed; then every path
scores the whole sequence (prompt and continuation), giving a log-probability per position:

- fused float32 equals transformers' float32 forward within 1e-3, and picks the same greedy tokens;
- fused bfloat16 is no further from float32 than transformers' own bfloat16 (mean and p90);
- bfloat16 logits are float32 (not rounded to bfloat16): no two top tokens tie where float32 tells
  them apart, and greedy agrees with float32 wherever float32's margin is clear of bf16 noise.

It runs in float32 and in bfloat16 on every CPU, which covers what `dtype: auto` picks on this one
(bfloat16 is emulated, so slower, on CPUs without native bf16), so a CPU with other kernels cannot
pass by accident.
"""

from __future__ import annotations

import statistics

import pytest
import torch

from tests.engine import numerics

pytestmark = pytest.mark.slow

PROMPTS = [
    "What is the capital of France?",
    "Name three colours.",
    "Write a haiku about the sea.",
    "What is 2 + 2?",
    "Give me a tip for learning Python.",
    "Who wrote Romeo and Juliet?",
    "What is the boiling point of water?",
    "Explain photosynthesis in one sentence.",
    "Say hello.",
    "What is the largest planet in the solar system?",
    "Translate 'good morning' into Spanish.",
    "List two benefits of exercise.",
]
NEW_TOKENS = 20
CLEAR_MARGIN = 0.5  # far beyond bf16's log-prob error here (max about 0.3): float32's choice must hold


@pytest.fixture(scope="module")
def reference() -> dict:
    """Float32 through the fused path: prompts, greedy continuations, margins, logits and log-probs."""
    tokenizer, step = numerics.load(torch.float32)
    eos = frozenset({tokenizer.eos_token_id})
    out: dict = {
        "sequences": [],
        "prompt_lengths": [],
        "margins": [],
        "logits": [],
        "logprobs": [],
        "tokenizer": tokenizer,
    }
    for question in PROMPTS:
        prompt = numerics.chat_ids(tokenizer, question)
        tokens, margins = numerics.greedy(step, prompt, NEW_TOKENS, eos)
        ids = prompt + tokens
        logits = _fused_logits(step, ids)
        out["sequences"].append(ids)
        out["prompt_lengths"].append(len(prompt))
        out["margins"].append(margins)
        out["logits"].append(logits)
        out["logprobs"].append(numerics.logprobs_of(logits, ids))
    return out


def _fused_logits(step, ids: list[int]) -> torch.Tensor:  # noqa: ANN001
    """The fused path's logits predicting each token after the first (one prefill of the whole sequence)."""
    with torch.inference_mode():
        return step._logits(step._residual(numerics.StepPlan(prefills=[numerics.PrefillChunk(0, 0, ids[:-1], True)])))


def _errors(reference: dict, logprobs: list[torch.Tensor]) -> tuple[float, float, float]:
    errors = torch.cat([(a - b).abs() for a, b in zip(logprobs, reference["logprobs"], strict=True)]).tolist()
    return statistics.fmean(errors), statistics.quantiles(errors, n=10)[-1], max(errors)


def test_fused_float32_equals_transformers_float32(reference: dict) -> None:
    _, model = numerics.load(torch.float32, fused=None)
    for ids, prompt_length, margins, fused in zip(
        reference["sequences"], reference["prompt_lengths"], reference["margins"], reference["logprobs"], strict=True
    ):
        logits = numerics.reference_logits(model, ids)
        assert (numerics.logprobs_of(logits, ids) - fused).abs().max() < 1e-3
        chosen = logits[prompt_length - 1 :].argmax(-1).tolist()
        for position, (theirs, ours, margin) in enumerate(zip(chosen, ids[prompt_length:], margins, strict=True)):
            assert theirs == ours or margin < 1e-3, f"position {position}: {theirs} against {ours}"


def test_fused_bf16_no_further_from_float32_than_transformers_bf16(reference: dict) -> None:
    _, step = numerics.load(torch.bfloat16)
    fused = [numerics.logprobs_of(_fused_logits(step, ids), ids) for ids in reference["sequences"]]
    del step
    _, model = numerics.load(torch.bfloat16, fused=None)
    theirs = [numerics.logprobs_of(numerics.reference_logits(model, ids), ids) for ids in reference["sequences"]]
    fused_err, theirs_err = _errors(reference, fused), _errors(reference, theirs)
    print(f"abs log-prob error mean/p90/max: fused bf16 {fused_err}, transformers bf16 {theirs_err}")
    assert fused_err[0] <= theirs_err[0] and fused_err[1] <= theirs_err[1]


def test_bf16_logits_are_float32(reference: dict) -> None:
    """Logits rounded to bf16 (a step of 0.125 at these magnitudes) tie often among the top tokens;
    float32 logits from bf16 weights tie only where float32 does."""
    _, step = numerics.load(torch.bfloat16)
    eos = frozenset({reference["tokenizer"].eos_token_id})
    positions = ties = 0
    for ids, prompt_length, margins, logits32 in zip(
        reference["sequences"], reference["prompt_lengths"], reference["margins"], reference["logits"], strict=True
    ):
        logits = _fused_logits(step, ids)
        assert logits.dtype == torch.float32
        top = torch.topk(logits, 2).values
        top32 = torch.topk(logits32, 2).values
        tied = (top[:, 0] == top[:, 1]) & (top32[:, 0] != top32[:, 1])
        positions += len(top)
        ties += int(tied.sum())
        # the greedy continuation in bf16 keeps float32's tokens up to the first position where
        # float32's own margin is within bf16 noise
        tokens, _ = numerics.greedy(step, ids[:prompt_length], NEW_TOKENS, eos)
        for ours, want, margin in zip(tokens, ids[prompt_length:], margins, strict=False):
            if margin < CLEAR_MARGIN:
                break
            assert ours == want, f"bf16 chose {ours} where float32 prefers {want} by {margin:.3f}"
    assert ties == 0, f"{ties} of {positions} positions have their top two logits tied in bf16 only"

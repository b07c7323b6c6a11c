"""One stream at full speed: the gateway streaming one chat request at a time against offline
`model.generate` of one sequence, same model, dtype and prompts, in one run, and how near a decode
step comes to the memory-bandwidth limit.

    python bench/single_stream.py [--rounds 6] [--max-tokens 64]     (make bench-single)

Measured in one process, interleaved so that load from elsewhere on the machine hits both alike:
  * the machine's memory bandwidth: the best of several float32 `sum`s over a 1 GiB tensor (read
    only, as a decode step's weights are), and a copy for reference;
  * the bytes one decode step of the default chat model reads: the fused path's weights as the
    engine holds them (prepacked layers, the head as the engine keeps it), measured from the loaded
    step model, plus the KV cache of one ~100-token sequence;
  * the fused decode step alone (one sequence, in this process): its median time, and so the
    fraction of the bandwidth limit (bytes / step time / bandwidth);
  * `gateway serve` (embedded default configuration) streaming one request at a time: the median
    tokens/s of a request end to end (request sent to last token, prompt included) and the
    median time between tokens;
  * offline `model.generate` of one sequence (transformers, the plain checkpoint, same dtype) on
    the same prompts, `max_tokens` new tokens each.
Rounds alternate a gateway request and a `generate` call per prompt. Writes bench/single_stream.json.

`--compile` adds the engine's `compile` setting (the decode step through torch.compile) in the same
run: the fused decode step compiled against eager, for one row and for 8 rows, timed alternately in
this process, and a second gateway with `compile: true` streaming in the same rounds; the compile
time at load is reported. `--dtype float32` measures the chat model in float32 instead of `auto`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import aiohttp

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.engine_load import (  # noqa: E402
    CHAT_MODEL,
    PROMPTS,
    chat_checkpoint,
    cpu_model,
    free_port,
    gateway_cmd,
    generate_seconds,
    one_stream,
    server,
)


def bandwidth(gib: float = 1.0, runs: int = 7) -> dict[str, float]:
    """GB/s: a float32 sum (reads only) and a copy (reads + writes, counted both ways); best of runs."""
    import torch

    data = torch.ones(int(gib * 2**30) // 4)
    target = torch.empty_like(data)
    best_sum = best_copy = float("inf")
    for _ in range(runs):
        started = time.perf_counter()
        data.sum()
        best_sum = min(best_sum, time.perf_counter() - started)
        started = time.perf_counter()
        target.copy_(data)
        best_copy = min(best_copy, time.perf_counter() - started)
    return {"sum_gb_s": data.nbytes / best_sum / 1e9, "copy_gb_s": 2 * data.nbytes / best_copy / 1e9}


def _nbytes(tensor: Any) -> int:
    return int(tensor.numel() * tensor.element_size())


def step_bytes(step: Any, context: int) -> dict[str, int]:
    """What one decode step of one sequence reads: every layer's weights, the head, the norms, and
    keys and values of `context` positions."""
    layers = 0
    for layer in step.layers:
        for value in layer.values():
            if value is None:
                continue
            if hasattr(value, "weight"):  # PackedLinear
                layers += _nbytes(value.weight) + (0 if value.bias is None else _nbytes(value.bias))
            else:
                layers += _nbytes(value)
    head = step.head
    if getattr(head, "half", None) is not None:  # one row: float16 weights (2 bytes each)
        head_bytes = head.out_features * step.embed.shape[1] * 2
    elif hasattr(head, "full"):  # the float32 copy
        head_bytes = _nbytes(head.full.weight)
    else:  # trees before issue 17: a PackedLinear of the float32 copy
        head_bytes = _nbytes(head.weight)
    kv = int(step.cache.bytes_per_token()) * context
    return {"layers": layers, "head": head_bytes, "kv_cache": kv, "total": layers + head_bytes + kv}


def decode_plan(step: Any, context: int, rows: int = 1) -> Any:
    """A decode step of `rows` sequences in slots 0..rows-1 (prefilled with ~`context` tokens each,
    of different lengths when there are several)."""
    from gateway.engine.generation.step import PrefillChunk, StepPlan

    lengths = [context - 3 * i for i in range(rows)]
    for slot, length in enumerate(lengths):
        step.forward(StepPlan(prefills=[PrefillChunk(slot, 0, list(range(10 + slot, 10 + slot + length)), True)]))
    return StepPlan(decode_slots=list(range(rows)), decode_tokens=[100] * rows, decode_positions=lengths)


def decode_step_ms(step: Any, context: int, steps: int = 30, runs: int = 5) -> float:
    """Median time of the fused decode step for one sequence (slot 0 prefilled with `context` tokens)."""
    return step_times(step, decode_plan(step, context), {"step": None}, steps, runs)["step"]


def step_times(
    step: Any, plan: Any, variants: dict[str, Any], steps: int = 30, runs: int = 5, attribute: str = "compiled"
) -> dict[str, float]:
    """Median ms of `plan`'s decode step for each variant (the value set as the step model's
    `attribute`; for `compiled`, None is eager), the variants' runs alternating (the first of each
    warms up)."""
    import torch

    times: dict[str, list[float]] = {name: [] for name in variants}
    with torch.inference_mode():
        for run in range(runs + 1):
            for name, value in variants.items():
                setattr(step, attribute, value)
                started = time.perf_counter()
                for _ in range(steps):
                    step.forward(plan)
                if run:  # the first run of each warms up
                    times[name].append((time.perf_counter() - started) / steps * 1e3)
    return {name: statistics.median(values) for name, values in times.items()}


def compiled_steps(step: Any, context: int) -> dict[str, Any]:
    """The decode step compiled (`compile: true`) against eager, one row and 8, alternating."""
    seconds = step.compile_decode()
    if seconds is None:
        return {"error": "torch.compile failed (see the warning above); nothing compiled"}
    variants = {"eager": None, "compiled": step.compiled}
    found: dict[str, Any] = {"compile_seconds": seconds}
    for rows in (1, 8):
        found[f"rows_{rows}_ms"] = times = step_times(step, decode_plan(step, context, rows), variants)
        print(
            f"decode step, {rows} row(s): eager {times['eager']:.1f} ms, compiled {times['compiled']:.1f} ms "
            f"({times['eager'] / times['compiled']:.2f}x); compiled at load in {seconds:.0f} s",
            flush=True,
        )
    return found


def variant_config(base: Path | None, out: Path, **backend: Any) -> Path:
    """The gateway config `base` (or the embedded default) with the chat model's backend settings changed."""
    import yaml

    from gateway.config import default_config_text

    data = yaml.safe_load(base.read_text() if base else default_config_text())
    chat = next(m for m in data["models"] if m["name"] == CHAT_MODEL)
    chat["backend"].update(backend)
    out.write_text(yaml.safe_dump(data, sort_keys=False))
    return out


async def gateway_once(url: str, prompt: str, max_tokens: int, tokenizer: Any) -> dict[str, float] | None:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=300)) as session:
        sample = await one_stream(session, url, CHAT_MODEL, prompt, max_tokens)
    if sample.error or not sample.chunks:
        return None
    tokens = len(tokenizer(sample.text, add_special_tokens=False)["input_ids"])
    gaps = [b - a for a, b in zip(sample.chunks, sample.chunks[1:], strict=False)]
    return {"tokens": tokens, "seconds": sample.end - sample.sent, "itl": statistics.median(gaps)}


def rounds(
    configs: dict[str, Path | None], model: Any, tokenizer: Any, count: int, max_tokens: int
) -> tuple[dict[str, tuple[list[dict[str, float]], int]], list[float]]:
    """Each gateway (label: config) serving one request at a time, and offline generate, alternating
    per prompt; each gateway's runs and failures, and generate's seconds."""
    from contextlib import ExitStack

    found: dict[str, tuple[list[dict[str, float]], int]] = {label: ([], 0) for label in configs}
    offline: list[float] = []
    with ExitStack() as stack:
        urls = {}
        for label, config in configs.items():
            port = free_port()
            log_path = ROOT / "bench-results" / f"single-{label}.log"
            urls[label] = stack.enter_context(server(gateway_cmd(port, config), port, "/ready", log_path))
            asyncio.run(gateway_once(urls[label], PROMPTS[0], 8, tokenizer))  # warm-up
        generate_seconds(model, tokenizer, [PROMPTS[0]], 8)
        for r in range(count):
            prompt = PROMPTS[r % len(PROMPTS)]
            for label, url in urls.items():
                run = asyncio.run(gateway_once(url, prompt, max_tokens, tokenizer))
                runs, failed = found[label]
                if run is None:
                    found[label] = (runs, failed + 1)
                else:
                    runs.append(run)
            offline.append(generate_seconds(model, tokenizer, [prompt], max_tokens))
            print(f"  round {r + 1}/{count}", flush=True)
    return found, offline


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=6, help="Prompts run on each side (alternating).")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--config", type=Path, help="Gateway config to measure instead of the embedded default.")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "single_stream.json")
    parser.add_argument("--compile", action="store_true", help="Also the `compile` setting, in the same run.")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], help="The chat model's dtype (default: its own).")
    args = parser.parse_args()
    (ROOT / "bench-results").mkdir(exist_ok=True)
    if args.dtype:
        args.config = variant_config(args.config, ROOT / "bench-results" / "single-dtype.yaml", dtype=args.dtype)

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from gateway.config import load_settings
    from tests.engine import numerics

    settings = load_settings(args.config)
    checkpoint, dtype = chat_checkpoint(settings)
    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    results: dict[str, Any] = {
        "command": "python bench/single_stream.py " + " ".join(sys.argv[1:]),
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "cpu": f"{torch.get_num_threads()} threads, {cpu_model()}",
        "dtype": dtype,
        "max_tokens": args.max_tokens,
    }
    print(f"{results['cpu']}; default chat model in {dtype}", flush=True)
    results["bandwidth"] = bw = bandwidth()
    print(f"memory bandwidth: sum {bw['sum_gb_s']:.1f} GB/s, copy {bw['copy_gb_s']:.1f} GB/s", flush=True)

    _, step = numerics.load(getattr(torch, dtype), slots=16)
    context = 100
    results["step_bytes"] = sizes = step_bytes(step, context)
    results["decode_step_ms"] = step_ms = decode_step_ms(step, context)
    if args.compile:
        results["compiled_step"] = compiled_steps(step, context)
    del step
    limit_ms = sizes["total"] / (bw["sum_gb_s"] * 1e9) * 1e3
    print(
        f"decode step reads {sizes['total'] / 1e6:.0f} MB (layers {sizes['layers'] / 1e6:.0f}, head "
        f"{sizes['head'] / 1e6:.0f}): {limit_ms:.1f} ms at the measured bandwidth; fused step {step_ms:.1f} ms",
        flush=True,
    )

    model = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=getattr(torch, dtype)).eval()
    configs = {"gateway": args.config}
    if args.compile:
        compiled_config = ROOT / "bench-results" / "single-compile.yaml"
        configs["gateway_compiled"] = variant_config(args.config, compiled_config, compile=True)
    runs, offline_runs = rounds(configs, model, tokenizer, args.rounds, args.max_tokens)
    offline_tps = statistics.median(args.max_tokens / s for s in offline_runs)
    results["offline_generate"] = {"tokens_per_s": offline_tps, "seconds": [round(s, 3) for s in offline_runs]}
    for label, (gateway_runs, failed) in runs.items():
        summary: dict[str, Any] = {
            "tokens_per_s": statistics.median(g["tokens"] / g["seconds"] for g in gateway_runs),
            "itl_ms": statistics.median(g["itl"] for g in gateway_runs) * 1e3,
            "failed": failed,
            "runs": [{k: round(v, 4) for k, v in g.items()} for g in gateway_runs],
        }
        summary["ratio_vs_offline"] = summary["tokens_per_s"] / offline_tps
        summary["bandwidth_fraction_itl"] = limit_ms / summary["itl_ms"]
        results[label] = summary
    gateway_tps, itl = results["gateway"]["tokens_per_s"], results["gateway"]["itl_ms"] / 1e3
    results["ratio_vs_offline"] = gateway_tps / offline_tps
    results["bandwidth_fraction"] = {
        "decode_step": limit_ms / step_ms,
        "gateway_itl": limit_ms / (itl * 1e3),
    }
    if "gateway_compiled" in results:
        c = results["gateway_compiled"]
        print(
            f"\ngateway with compile: true: {c['tokens_per_s']:.1f} tok/s (ITL {c['itl_ms']:.1f} ms), "
            f"{c['tokens_per_s'] / gateway_tps:.2f}x the eager gateway; {c['ratio_vs_offline']:.2f}x offline",
            flush=True,
        )
    print(
        f"\ngateway, one stream: {gateway_tps:.1f} tok/s (ITL {itl * 1e3:.1f} ms); offline generate: "
        f"{offline_tps:.1f} tok/s; ratio {results['ratio_vs_offline']:.2f}x (target >= 1.5x)\n"
        f"fraction of the bandwidth limit: decode step {limit_ms / step_ms:.0%}, gateway ITL "
        f"{limit_ms / (itl * 1e3):.0%}",
        flush=True,
    )
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()

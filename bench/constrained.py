"""What constrained decoding costs the batch: one command, prints and writes JSON.

    python bench/constrained.py [--rounds 3] [--seconds 20] [--concurrency 8] [--max-tokens 64]

`gateway serve` with its default configuration (SmolLM2-135M-Instruct). A closed loop keeps
`concurrency` chat requests in flight (each client sends its next request when the previous one
ends). Two mixes, interleaved round by round in the same run: all unconstrained, and half of the
clients asking for a `json_schema` response_format (a different schema per request, so grammar
compiles are paid too). Output tokens/s is the usage's completion tokens over the window; the
report gives medians over rounds and the ratio (target: constrained >= 0.9 x unconstrained).
Also: the grammar compile time per schema, in process, with the model's tokenizer.
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

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.engine_load import cpu_model, free_port, gateway_cmd, server  # noqa: E402

MODEL = "smollm2-135m-instruct"
PROMPTS = ["Tell me about the sea.", "Describe a city.", "Write about a dog.", "Explain rain."]


def schema(k: int) -> dict[str, Any]:
    """A different (but similar) schema per request: `k` names its fields."""
    return {
        "type": "object",
        "properties": {
            f"title_{k}": {"type": "string"},
            "kind": {"enum": ["a", "b", "c"]},
            "tags": {"type": "array", "items": {"type": "string"}, "maxItems": 3},
            "score": {"type": "integer"},
        },
        "required": [f"title_{k}", "kind", "tags", "score"],
    }


async def one(client: httpx.AsyncClient, url: str, k: int, constrained: bool, max_tokens: int) -> int:
    body: dict[str, Any] = {
        "model": MODEL,
        "messages": [
            {"role": "user", "content": PROMPTS[k % len(PROMPTS)] + (" Answer in JSON." if constrained else "")}
        ],
        "max_tokens": max_tokens,
        "temperature": 0.7,
        "seed": k,
    }
    if constrained:
        body["response_format"] = {"type": "json_schema", "json_schema": {"name": "r", "schema": schema(k)}}
    r = await client.post(f"{url}/v1/chat/completions", json=body)
    r.raise_for_status()
    return int(r.json()["usage"]["completion_tokens"])


async def closed_loop(url: str, concurrency: int, constrained: int, seconds: float, max_tokens: int) -> float:
    """Output tokens/s with `constrained` of the `concurrency` clients constrained."""
    counter = iter(range(10**9))
    deadline = time.monotonic() + seconds
    tokens = 0

    async def client_loop(c: int, http: httpx.AsyncClient) -> None:
        nonlocal tokens
        while time.monotonic() < deadline:
            # awaited first: `tokens += await ...` reads `tokens` before the await, losing the
            # other clients' additions made meanwhile
            done = await one(http, url, next(counter), c < constrained, max_tokens)
            tokens += done

    async with httpx.AsyncClient(timeout=300) as http:
        started = time.monotonic()
        await asyncio.gather(*(client_loop(c, http) for c in range(concurrency)))
        return tokens / (time.monotonic() - started)


def compile_times(count: int) -> dict[str, float]:
    """Cold compile of `count` distinct schemas with the gateway's compiler (the tokenizer built first)."""
    from bench.grammar_engines import tokenizer
    from gateway.domain import Grammar
    from gateway.engine.generation.grammar import GrammarCompiler

    tok = tokenizer()
    compiler = GrammarCompiler(tok, len(tok), frozenset({tok.eos_token_id}))
    started = time.perf_counter()
    compiler.compile(Grammar("json_object"))
    setup = time.perf_counter() - started
    times = []
    for k in range(count):
        started = time.perf_counter()
        compiler.compile(Grammar("json_schema", json.dumps(schema(k))))
        times.append(time.perf_counter() - started)
    return {
        "tokenizer_setup_ms": setup * 1e3,
        "compile_median_ms": statistics.median(times) * 1e3,
        "compile_max_ms": max(times) * 1e3,
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=20)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--out", default=str(ROOT / "bench" / "constrained.json"))
    args = parser.parse_args()
    port = free_port()
    runs: dict[str, list[float]] = {"unconstrained": [], "half_constrained": []}
    with server(gateway_cmd(port, None), port, "/ready", Path("/tmp/bench-constrained.log")) as url:
        asyncio.run(closed_loop(url, args.concurrency, args.concurrency // 2, 5, args.max_tokens))  # warm up
        for r in range(args.rounds):
            order = ["unconstrained", "half_constrained"][:: 1 if r % 2 == 0 else -1]
            for mix in order:
                constrained = args.concurrency // 2 if mix == "half_constrained" else 0
                rate = asyncio.run(closed_loop(url, args.concurrency, constrained, args.seconds, args.max_tokens))
                runs[mix].append(rate)
                print(f"round {r + 1} {mix}: {rate:.1f} tokens/s", flush=True)
    medians = {mix: statistics.median(rates) for mix, rates in runs.items()}
    report = {
        "cpu": cpu_model(),
        "concurrency": args.concurrency,
        "max_tokens": args.max_tokens,
        "seconds_per_window": args.seconds,
        "runs_tokens_per_s": runs,
        "median_tokens_per_s": medians,
        "ratio": medians["half_constrained"] / medians["unconstrained"],
        "target_ratio": 0.9,
        "compile": compile_times(20),
    }
    print(json.dumps(report, indent=2))
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()

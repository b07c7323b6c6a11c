"""Multi-turn chat traffic: what prefix caching buys. One command, one JSON file.

    python bench/multiturn.py [--users 16] [--turns 6] [--max-tokens 64] [--system-tokens 1000]

Simulated users hold conversations with the default chat model (SmolLM2-135M-Instruct): every
conversation starts with the same system prompt of about `--system-tokens` tokens, and each turn
the client sends the whole history (system prompt, every question and every answer so far) plus a
new question, streams the answer (greedy, `max_tokens`; the API has no way to ignore EOS, so an
answer that ends early counts the tokens that came), and sends the next turn when it has it. All
users run at once. Targets, one after the other, each on its own server:
  * the gateway with its prefix cache (the default);
  * the same gateway with `prefix_cache: false`;
  * `transformers serve --continuous-batching` at bfloat16 (its best dtype here, bench/engine_load.py)
    on the plain checkpoint of the same model, started as bench/engine_load.py starts it.
Reported per target: median time to first token over every request (and per turn), output tokens/s
over the whole run (answers re-tokenised with the model's tokenizer, the same way for every target)
and, for the gateway, the prompt tokens served from the cache (`usage.prompt_tokens_details`).
Targets (issue 17): TTFT with the cache at most 0.3x the cache-off figure, tokens/s at least 1.5x.

Writes bench/multiturn.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import aiohttp
import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.engine_load import (  # noqa: E402
    CHAT_MODEL,
    TF_BF16,
    chat_checkpoint,
    cpu_model,
    free_port,
    gateway_cmd,
    server,
    transformers_server,
)

CACHE_ON, CACHE_OFF = "gateway (prefix cache on)", "gateway (prefix cache off)"
POLICY = [
    "Orders ship within two business days from our warehouse in Lyon.",
    "Customers may return unused items within thirty days for a full refund.",
    "Gift cards never expire and can be combined with any other offer.",
    "Support answers by e-mail within one business day, by phone from 9am to 5pm.",
    "Loyalty members collect one point per euro and get free shipping over fifty euros.",
    "Damaged parcels must be reported within seven days with a photo of the damage.",
    "Prices include VAT; invoices are sent by e-mail once the order has shipped.",
    "We ship to every country of the European Union, Switzerland and Norway.",
]
QUESTIONS = [
    "How long does shipping take?",
    "Can I return a jacket I wore once?",
    "Do gift cards expire?",
    "When can I call support?",
    "How do loyalty points work?",
    "My parcel arrived damaged, what now?",
    "Are prices shown with VAT?",
    "Do you ship to Norway?",
    "Can I combine a gift card with a discount?",
    "Summarise your return policy in one sentence.",
    "What should I include when reporting damage?",
    "Is shipping free for members?",
]


def system_prompt(tokenizer: Any, tokens: int) -> str:
    """Numbered policy sections until the text is about `tokens` tokens long."""
    parts = ["You are the customer service assistant of Maison Lumière, an online shop. Rules:"]
    n = 0
    while len(tokenizer.encode(" ".join(parts))) < tokens:
        parts.append(f"Section {n + 1}: {POLICY[n % len(POLICY)]}")
        n += 1
    return " ".join(parts)


async def turn(
    session: aiohttp.ClientSession, url: str, model: str, messages: list[dict[str, str]], max_tokens: int, usage: bool
) -> dict[str, Any]:
    """One streamed answer: its text, time to first token and the cached prompt tokens reported."""
    body: dict[str, Any] = {"model": model, "messages": messages, "max_tokens": max_tokens, "temperature": 0}
    body["stream"] = True
    if usage:
        body["stream_options"] = {"include_usage": True}
    sent = time.perf_counter()
    out: dict[str, Any] = {"text": "", "ttft": None, "cached": None, "prompt_tokens": None, "error": None}
    async with session.post(f"{url}/v1/chat/completions", json=body) as resp:
        if resp.status != 200:
            out["error"] = f"HTTP {resp.status}: {(await resp.text())[:200]}"
            return out
        async for raw in resp.content:
            line = raw.decode().strip()
            if not line.startswith("data:") or line[5:].strip() == "[DONE]":
                continue
            event = json.loads(line[5:])
            for choice in event.get("choices") or []:
                piece = (choice.get("delta") or {}).get("content") or ""
                if piece and out["ttft"] is None:
                    out["ttft"] = time.perf_counter() - sent
                out["text"] += piece
            if event.get("usage"):
                out["prompt_tokens"] = event["usage"].get("prompt_tokens")
                out["cached"] = (event["usage"].get("prompt_tokens_details") or {}).get("cached_tokens")
    return out


async def user(url: str, model: str, user_id: int, system: str, args: argparse.Namespace, usage: bool) -> list[dict]:
    """One conversation of `args.turns` turns, the whole history resent each turn."""
    messages = [{"role": "system", "content": system}]
    results = []
    timeout = aiohttp.ClientTimeout(total=1800)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        for t in range(args.turns):
            question = QUESTIONS[(user_id * 5 + t) % len(QUESTIONS)]
            messages.append({"role": "user", "content": f"(customer #{user_id}) {question}"})
            result = await turn(session, url, model, messages, args.max_tokens, usage)
            result["turn"] = t
            results.append(result)
            messages.append({"role": "assistant", "content": result["text"]})
    return results


async def workload(url: str, model: str, system: str, args: argparse.Namespace, usage: bool) -> tuple[list, float]:
    began = time.perf_counter()
    per_user = await asyncio.gather(*(user(url, model, u, system, args, usage) for u in range(args.users)))
    return [r for rows in per_user for r in rows], time.perf_counter() - began


def summarise(rows: list[dict[str, Any]], seconds: float, tokenizer: Any) -> dict[str, Any]:
    ok = [r for r in rows if r["error"] is None and r["ttft"] is not None]
    tokens = sum(len(tokenizer.encode(r["text"], add_special_tokens=False)) for r in ok)
    by_turn = {}
    for t in sorted({r["turn"] for r in ok}):
        by_turn[str(t + 1)] = statistics.median(r["ttft"] for r in ok if r["turn"] == t)
    prompt = sum(r["prompt_tokens"] or 0 for r in ok)
    cached = sum(r["cached"] or 0 for r in ok)
    return {
        "requests": len(rows),
        "failed": len(rows) - len(ok),
        "errors": sorted({r["error"] for r in rows if r["error"]})[:3],
        "ttft_p50": statistics.median(r["ttft"] for r in ok) if ok else None,
        "ttft_p50_by_turn": by_turn,
        "output_tokens": tokens,
        "seconds": seconds,
        "output_tokens_per_s": tokens / seconds,
        "prompt_tokens": prompt or None,
        "cached_tokens": cached if prompt else None,
    }


def gateway_config(tmp: Path, cache: bool) -> Path:
    """The embedded default configuration's chat model alone, its prefix cache on or off."""
    from gateway.config import load_settings

    spec = next(m for m in load_settings(None).models if m.name == CHAT_MODEL)
    model = spec.model_dump(mode="json", exclude_none=True)
    model["backend"]["prefix_cache"] = cache
    path = tmp / f"gateway-{'cache' if cache else 'nocache'}.yaml"
    path.write_text(yaml.safe_dump({"models": [model]}))
    return path


def run_target(label: str, args: argparse.Namespace, tmp: Path, checkpoint: str, system: str, tokenizer: Any) -> dict:
    if label == TF_BF16:
        context = transformers_server(checkpoint, "bfloat16", tmp / "transformers-bfloat16.log")
        model, usage = checkpoint, False
    else:
        port = free_port()
        config = gateway_config(tmp, label == CACHE_ON)
        context = server(gateway_cmd(port, config), port, "/ready", tmp / f"{config.stem}.log")
        model, usage = CHAT_MODEL, True
    with context as url:
        warm = argparse.Namespace(**{**vars(args), "users": 1, "turns": 1, "max_tokens": 4})
        asyncio.run(workload(url, model, "Hello.", warm, usage))  # warm-up: lazy initialisation, first allocations
        rows, seconds = asyncio.run(workload(url, model, system, args, usage))
    row = summarise(rows, seconds, tokenizer)
    cached = f", {row['cached_tokens']}/{row['prompt_tokens']} prompt tokens cached" if row["prompt_tokens"] else ""
    print(
        f"  {label[:44]:<44} TTFT p50 {row['ttft_p50']:.3f} s  {row['output_tokens_per_s']:6.1f} tok/s  "
        f"failed {row['failed']}{cached}",
        flush=True,
    )
    return row


def checks(results: dict[str, Any]) -> list[dict[str, Any]]:
    on, off = results["targets"].get(CACHE_ON), results["targets"].get(CACHE_OFF)
    if not on or not off or not on["ttft_p50"] or not off["ttft_p50"]:
        return []
    ttft = on["ttft_p50"] / off["ttft_p50"]
    speed = on["output_tokens_per_s"] / off["output_tokens_per_s"]
    rows = [
        {"check": "median TTFT, cache on / off <= 0.3", "value": round(ttft, 3), "ok": ttft <= 0.3},
        {"check": "output tokens/s, cache on / off >= 1.5", "value": round(speed, 2), "ok": speed >= 1.5},
    ]
    tf = results["targets"].get(TF_BF16)
    if tf and tf["ttft_p50"]:
        rows.append(
            {
                "check": "vs transformers serve (bf16): TTFT ratio, tok/s ratio (information)",
                "value": [
                    round(on["ttft_p50"] / tf["ttft_p50"], 3),
                    round(on["output_tokens_per_s"] / tf["output_tokens_per_s"], 2),
                ],
                "ok": True,
            }
        )
    return rows


def arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--users", type=int, default=16)
    parser.add_argument("--turns", type=int, default=6)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--system-tokens", type=int, default=1000)
    parser.add_argument("--skip-transformers", action="store_true")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "multiturn.json")
    return parser.parse_args()


def main() -> None:
    args = arguments()
    from transformers import AutoTokenizer

    from gateway.config import load_settings

    checkpoint, dtype = chat_checkpoint(load_settings(None))
    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    system = system_prompt(tokenizer, args.system_tokens)
    tmp = ROOT / "bench-results" / time.strftime("multiturn-%Y%m%d-%H%M%S")
    tmp.mkdir(parents=True, exist_ok=True)
    print(
        f"{args.users} users x {args.turns} turns, system prompt {len(tokenizer.encode(system))} tokens, "
        f"answers of {args.max_tokens} tokens; gateway in {dtype}; logs in {tmp}",
        flush=True,
    )
    results: dict[str, Any] = {
        "command": "python bench/multiturn.py " + " ".join(sys.argv[1:]),
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "cpu": f"{os.cpu_count()} CPU cores, {cpu_model()}",
        "dtype": dtype,
        "users": args.users,
        "turns": args.turns,
        "max_tokens": args.max_tokens,
        "system_prompt_tokens": len(tokenizer.encode(system)),
        "targets": {},
    }
    labels = [CACHE_ON, CACHE_OFF] + ([] if args.skip_transformers else [TF_BF16])
    for label in labels:
        results["targets"][label] = run_target(label, args, tmp, checkpoint, system, tokenizer)
        args.out.write_text(json.dumps(results, indent=2) + "\n")  # what is measured so far
    results["checks"] = checks(results)
    print("\nchecks:")
    for row in results["checks"]:
        print(f"  [{'ok' if row['ok'] else 'MISSED'}] {row['check']}: {row['value']}")
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()

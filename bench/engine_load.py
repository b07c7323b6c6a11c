"""Local inference engine under load: one command, one JSON file, one plot.

    python bench/engine_load.py [--levels 1 4 8 16] [--rounds 3] [--requests-per-client 2] [--max-tokens 64]

In one run, on the default chat model (SmolLM2-135M-Instruct) with the same prompts and
token counts for every target:
  * the gateway: `gateway serve` with its embedded default configuration;
  * `transformers serve --continuous-batching`, at `--dtype bfloat16` and at its defaults, on a
    plain checkpoint saved from the loaded model (it cannot read the SmolLM2 GGUF itself), its
    KV cache capped at 10% of the memory (see `transformers_server`);
  * offline `model.generate`, one static batch the size of each concurrency level, in the
    gateway's dtype (a reference point with no server at all).
The servers run side by side (idle ones use no CPU) and the measurements are interleaved:
each round runs every level against every target, in a rotating order, and the report gives
the median over rounds. A closed-loop load generator keeps `c` streaming chat requests in
flight (each client sends its next request when the previous one ends) and reports, per
level: time to first token, inter-token latency (every gap between content chunks, pooled),
end-to-end latency (p50/p90), output tokens/s, requests/s and failed or truncated streams.
Output tokens are counted by re-tokenising each answer with the model's tokenizer, the same
way for every server.

Encoder batching is measured in the same run: single-sentence embedding requests at
concurrency 1 and 16 against the default embedding model, batched (the default) and
unbatched (`max_batch_size: 1`).

Writes bench/engine_load.json and bench/engine_load.png (unless --no-plot; the plot needs
matplotlib, which `make bench-engine` installs).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import shutil
import socket
import statistics
import subprocess
import sys
import time
from contextlib import AbstractContextManager, ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

PROMPTS = [
    "Write a long story about a dragon who learns to cook.",
    "Describe, in detail, a day in the life of a lighthouse keeper.",
    "Explain how a steam engine works, step by step, for a curious child.",
    "Write a long letter from a sailor to his family back home.",
    "Tell a long fairy tale about a fox and a clever crow.",
    "Describe a busy market in a medieval town in great detail.",
    "Write the opening chapter of a mystery novel set on a train.",
    "Explain the water cycle in detail, with examples from everyday life.",
    "Write a long story about a robot who wants to become a gardener.",
    "Describe a journey across a desert on a camel, day by day.",
    "Write a detailed travel guide for a small village in the mountains.",
    "Tell a long story about two friends who build a boat together.",
    "Describe how bread is made, from the wheat field to the bakery.",
    "Write a long diary entry of an astronaut on her first day in space.",
    "Tell a long story about a cat who becomes the mayor of a town.",
    "Describe a thunderstorm over the sea from the point of view of a seagull.",
]
SENTENCE = "The quick brown fox jumps over the lazy dog near the river bank."
CHAT_MODEL = "smollm2-135m-instruct"
TF_BF16 = "transformers serve --continuous-batching --dtype bfloat16"
TF_DEFAULT = "transformers serve --continuous-batching (defaults: float32)"
EMBED_MODEL = "all-minilm-l6-v2"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


# --- servers ---------------------------------------------------------------------------------------


@contextmanager
def server(cmd: list[str], port: int, ready_path: str, log_path: Path, env: dict[str, str] | None = None) -> Any:
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT, env={**os.environ, **(env or {})})
        try:
            deadline = time.monotonic() + 600
            import httpx

            while True:
                if proc.poll() is not None:
                    raise RuntimeError(f"{cmd[0]} exited with {proc.returncode}; see {log_path}")
                try:
                    if httpx.get(f"http://127.0.0.1:{port}{ready_path}", timeout=2).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{cmd} not ready")
                time.sleep(0.5)
            yield f"http://127.0.0.1:{port}"
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def gateway_cmd(port: int, config: Path | None) -> list[str]:
    cmd = [sys.executable, "-m", "gateway", "serve", "--port", str(port), "--no-access-log", "--log-level", "warning"]
    return cmd + (["--config", str(config)] if config else [])


def transformers_server(checkpoint: str, dtype: str | None, log_path: Path) -> AbstractContextManager[str]:
    """`transformers serve --continuous-batching` on the checkpoint.

    Its KV cache is capped at 10% of the memory (3 GB here, far more than 16 streams of ~110
    tokens use): by default it takes a share of the free memory (13.8 GB here), so two of them
    run the machine out of memory, and allocating and freeing that much slowed whatever ran
    next on this virtual machine (the gateway by ~20%, measured).
    """
    exe = shutil.which("transformers", path=str(Path(sys.executable).parent)) or "transformers"
    port = free_port()
    cmd = [exe, "serve", checkpoint, "--continuous-batching", "--port", str(port), "--host", "127.0.0.1"]
    cmd += ["--cb-max-memory-percent", "0.1"]
    return server(cmd + (["--dtype", dtype] if dtype else []), port, "/health", log_path)


# --- streaming load generator ----------------------------------------------------------------------


@dataclass
class Sample:
    sent: float
    first: float | None = None
    chunks: list[float] = field(default_factory=list)
    end: float = 0.0
    text: str = ""
    finish: str | None = None
    done: bool = False
    error: str | None = None


async def one_stream(session: aiohttp.ClientSession, url: str, model: str, prompt: str, max_tokens: int) -> Sample:
    body = {
        "model": model,
        "messages": [{"role": "user", "content": prompt}],
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": True,
    }
    sample = Sample(sent=time.perf_counter())
    try:
        async with session.post(f"{url}/v1/chat/completions", json=body) as resp:
            if resp.status != 200:
                sample.error = f"HTTP {resp.status}: {(await resp.text())[:200]}"
                return sample
            async for raw in resp.content:
                line = raw.decode().strip()
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    sample.done = True
                    break
                event = json.loads(data)
                if "error" in event:
                    sample.error = str(event["error"])[:200]
                    break
                for choice in event.get("choices") or []:
                    piece = (choice.get("delta") or {}).get("content") or ""
                    if piece:
                        now = time.perf_counter()
                        sample.first = sample.first or now
                        sample.chunks.append(now)
                        sample.text += piece
                    if choice.get("finish_reason"):
                        sample.finish = choice["finish_reason"]
    except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
        sample.error = f"{type(exc).__name__}: {exc}"
    finally:
        sample.end = time.perf_counter()
    return sample


async def closed_loop(
    url: str, model: str, concurrency: int, per_client: int, max_tokens: int
) -> tuple[list[Sample], float]:
    timeout = aiohttp.ClientTimeout(total=900)
    async with aiohttp.ClientSession(timeout=timeout, connector=aiohttp.TCPConnector(limit=0)) as session:

        async def client(k: int) -> list[Sample]:
            out = []
            for r in range(per_client):
                prompt = PROMPTS[(k * per_client + r) % len(PROMPTS)]
                out.append(await one_stream(session, url, model, prompt, max_tokens))
            return out

        started = time.perf_counter()
        results = await asyncio.gather(*(client(k) for k in range(concurrency)))
        return [s for batch in results for s in batch], time.perf_counter() - started


def complete(sample: Sample) -> bool:
    """No error, some text, and a finish reason: the stream ended as the model finished, not cut short.
    (`transformers serve` closes its streams without `data: [DONE]`; the OpenAI SDK accepts both.)"""
    return sample.error is None and sample.finish is not None and sample.first is not None


def summarise(rounds: list[tuple[list[Sample], float]], tokenizer: Any) -> dict[str, Any]:
    """Throughput: the median over rounds; latencies: percentiles of every request of every round."""
    samples = [s for batch, _ in rounds for s in batch]
    ok = [s for s in samples if complete(s)]
    tokens = {id(s): len(tokenizer(s.text, add_special_tokens=False)["input_ids"]) for s in ok}
    per_round = [
        (sum(tokens.get(id(s), 0) for s in batch) / seconds, sum(complete(s) for s in batch) / seconds)
        for batch, seconds in rounds
    ]
    gaps = [b - a for s in ok for a, b in zip(s.chunks, s.chunks[1:], strict=False)]
    ttft = [s.first - s.sent for s in ok if s.first]
    e2e = [s.end - s.sent for s in ok]
    return {
        "requests": len(samples),
        "failed_or_truncated": len(samples) - len(ok),
        "errors": sorted({s.error for s in samples if s.error})[:3],
        "with_done_marker": sum(s.done for s in ok),
        "finished_by_length": sum(s.finish == "length" for s in ok),
        "mean_output_tokens": statistics.mean(tokens.values()) if tokens else 0,
        "output_tokens_per_s": statistics.median(r[0] for r in per_round),
        "output_tokens_per_s_rounds": [round(r[0], 1) for r in per_round],
        "requests_per_s": statistics.median(r[1] for r in per_round),
        "ttft_p50": percentile(ttft, 0.5),
        "ttft_p90": percentile(ttft, 0.9),
        "itl_p50": percentile(gaps, 0.5),
        "itl_p90": percentile(gaps, 0.9),
        "e2e_p50": percentile(e2e, 0.5),
        "e2e_p90": percentile(e2e, 0.9),
    }


def drive(
    targets: dict[str, tuple[str, str]],
    levels: list[int],
    rounds: int,
    per_client: int,
    max_tokens: int,
    tokenizer: Any,
) -> dict[str, dict[str, Any]]:
    """Every target at every level, `rounds` times, interleaved (the order of targets rotates each
    round), so that noise from the rest of the machine hits every target alike."""
    for url, model in targets.values():
        asyncio.run(closed_loop(url, model, 2, 1, 8))  # warm-up (lazy initialisation, first allocations)
    raw: dict[str, dict[int, list[tuple[list[Sample], float]]]] = {label: {c: [] for c in levels} for label in targets}
    labels = list(targets)
    for r in range(rounds):
        for label in labels[r % len(labels) :] + labels[: r % len(labels)]:
            url, model = targets[label]
            for c in levels:
                raw[label][c].append(asyncio.run(closed_loop(url, model, c, per_client, max_tokens)))
        print(f"  round {r + 1}/{rounds} done", flush=True)
    out: dict[str, dict[str, Any]] = {}
    for label in labels:
        out[label] = {}
        for c in levels:
            out[label][str(c)] = row = summarise(raw[label][c], tokenizer)
            print(
                f"  {label[:40]:<40} c={c:<3} {row['output_tokens_per_s']:7.1f} tok/s  "
                f"TTFT p50 {fmt(row['ttft_p50'])}  ITL p50 {fmt(row['itl_p50'])}  "
                f"e2e p50 {fmt(row['e2e_p50'])}  failed {row['failed_or_truncated']}",
                flush=True,
            )
    return out


def fmt(seconds: float | None) -> str:
    return "   -   " if seconds is None else f"{seconds * 1000:6.0f}ms"


# --- offline reference -----------------------------------------------------------------------------


def generate_seconds(model: Any, tokenizer: Any, prompts: list[str], max_tokens: int) -> float:
    """Seconds for offline `model.generate` of one static batch (one chat turn per prompt, left
    padded), exactly `max_tokens` new tokens each, greedy."""
    import torch

    texts = [
        tokenizer.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True, tokenize=False)
        for p in prompts
    ]
    batch = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    started = time.perf_counter()
    with torch.inference_mode():
        model.generate(
            **batch,
            max_new_tokens=max_tokens,
            min_new_tokens=max_tokens,
            do_sample=False,
            pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id,
        )
    return time.perf_counter() - started


def offline_generate(checkpoint: str, dtype: str, levels: list[int], max_tokens: int) -> dict[str, Any]:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    tokenizer.padding_side = "left"
    model = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=getattr(torch, dtype)).eval()
    out = {}
    for c in levels:
        seconds = statistics.median(generate_seconds(model, tokenizer, (PROMPTS * 4)[:c], max_tokens) for _ in range(3))
        out[str(c)] = {"output_tokens_per_s": c * max_tokens / seconds, "seconds": seconds}
        print(f"  {'offline generate ' + dtype:<28} c={c:<3} {c * max_tokens / seconds:7.1f} tok/s", flush=True)
    return out


# --- encoder batching ------------------------------------------------------------------------------


async def embed_load(url: str, model: str, concurrency: int, total: int) -> dict[str, Any]:
    latencies: list[float] = []
    failed = 0
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
        per_client = total // concurrency

        async def client() -> None:
            nonlocal failed
            for _ in range(per_client):
                sent = time.perf_counter()
                async with session.post(f"{url}/v1/embeddings", json={"model": model, "input": SENTENCE}) as resp:
                    await resp.read()
                    failed += resp.status != 200
                latencies.append(time.perf_counter() - sent)

        await asyncio.gather(*(client() for _ in range(2)))  # warm-up
        latencies.clear()
        started = time.perf_counter()
        await asyncio.gather(*(client() for _ in range(concurrency)))
        seconds = time.perf_counter() - started
    return {
        "requests_per_s": len(latencies) / seconds,
        "latency_p50": percentile(latencies, 0.5),
        "latency_p90": percentile(latencies, 0.9),
        "failed": failed,
    }


def embeddings(tmp: Path, total: int, rounds: int) -> dict[str, Any]:
    defaults = yaml.safe_load((ROOT / "gateway" / "default_config.yaml").read_text())
    embed = next(m for m in defaults["models"] if m["name"] == EMBED_MODEL)
    unbatched = {**embed, "name": "unbatched", "aliases": [], "backend": {**embed["backend"], "max_batch_size": 1}}
    config = tmp / "embeddings.yaml"
    config.write_text(yaml.safe_dump({"models": [embed, unbatched]}))
    port = free_port()
    out: dict[str, Any] = {}
    raw: dict[tuple[int, str], list[dict[str, Any]]] = {}
    with server(gateway_cmd(port, config), port, "/ready", tmp / "gateway-embed.log") as url:
        for r in range(rounds):
            for c in (1, 16):
                variants = [("batched", EMBED_MODEL), ("unbatched", "unbatched")]
                for name, model in variants[r % 2 :] + variants[: r % 2]:
                    raw.setdefault((c, name), []).append(asyncio.run(embed_load(url, model, c, total)))
    for (c, name), runs in sorted(raw.items()):
        out.setdefault(str(c), {})[name] = row = {
            key: statistics.median(run[key] for run in runs) for key in ("requests_per_s", "latency_p50", "latency_p90")
        }
        row["failed"] = sum(run["failed"] for run in runs)
        print(
            f"  embeddings {name:<10} c={c:<3} {row['requests_per_s']:7.1f} req/s  "
            f"p50 {fmt(row['latency_p50'])}  failed {row['failed']}",
            flush=True,
        )
    return out


# --- report ----------------------------------------------------------------------------------------


def checks(results: dict[str, Any], max_wait_ms: float) -> list[dict[str, Any]]:
    gw, targets = results["gateway"], results["targets"]
    tf_bf16 = targets.get(TF_BF16)
    tf_default = targets.get(TF_DEFAULT)
    offline = results.get("offline_generate", {})
    rows = []
    for c in ("8", "16"):
        if c not in gw:
            continue
        if tf_bf16 and c in tf_bf16:
            ratio = gw[c]["output_tokens_per_s"] / max(tf_bf16[c]["output_tokens_per_s"], 1e-9)
            rows.append(
                {"check": f"c={c} tok/s vs transformers serve bf16 >= 1.2x", "value": ratio, "ok": ratio >= 1.2}
            )
            ok = (gw[c]["ttft_p50"] or 1e9) <= (tf_bf16[c]["ttft_p50"] or 0)
            rows.append(
                {
                    "check": f"c={c} TTFT p50 <= transformers serve bf16",
                    "value": [gw[c]["ttft_p50"], tf_bf16[c]["ttft_p50"]],
                    "ok": ok,
                }
            )
        if tf_default and c in tf_default:
            ratio = gw[c]["output_tokens_per_s"] / max(tf_default[c]["output_tokens_per_s"], 1e-9)
            rows.append(
                {"check": f"c={c} tok/s vs transformers serve defaults >= 3x", "value": ratio, "ok": ratio >= 3}
            )
            ok = (gw[c]["ttft_p50"] or 1e9) <= (tf_default[c]["ttft_p50"] or 0)
            rows.append(
                {
                    "check": f"c={c} TTFT p50 <= transformers serve defaults",
                    "value": [gw[c]["ttft_p50"], tf_default[c]["ttft_p50"]],
                    "ok": ok,
                }
            )
    if "1" in gw and "1" in offline:
        ratio = gw["1"]["output_tokens_per_s"] / offline["1"]["output_tokens_per_s"]
        rows.append({"check": "c=1 tok/s vs offline generate (1 sequence) >= 1x", "value": ratio, "ok": ratio >= 1})
    failed = sum(r["failed_or_truncated"] for r in gw.values())
    unmarked = sum(r["requests"] - r["with_done_marker"] for r in gw.values())
    rows.append({"check": "no failed or truncated gateway stream", "value": failed, "ok": failed == 0})
    rows.append({"check": "every gateway stream closed by data: [DONE]", "value": unmarked, "ok": unmarked == 0})
    emb = results.get("embeddings")
    if emb:
        ratio = emb["16"]["batched"]["requests_per_s"] / emb["16"]["unbatched"]["requests_per_s"]
        rows.append({"check": "embeddings c=16 req/s batched vs unbatched >= 3x", "value": ratio, "ok": ratio >= 3})
        limit = emb["1"]["unbatched"]["latency_p50"] + max_wait_ms / 1000
        got = emb["1"]["batched"]["latency_p50"]
        rows.append(
            {"check": "embeddings c=1 p50 <= unbatched + max_wait_ms", "value": [got, limit], "ok": got <= limit}
        )
    return rows


def plot(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series = {"gateway": results["gateway"], **results["targets"]}
    offline = results.get("offline_generate")
    fig, axes = plt.subplots(1, 4, figsize=(20, 4.5))
    for label, rows in series.items():
        levels = sorted(int(c) for c in rows)
        axes[0].plot(levels, [rows[str(c)]["output_tokens_per_s"] for c in levels], marker="o", label=label)
        axes[1].plot(levels, [1000 * (rows[str(c)]["ttft_p50"] or 0) for c in levels], marker="o", label=label)
        axes[2].plot(levels, [1000 * (rows[str(c)]["itl_p50"] or 0) for c in levels], marker="o", label=label)
    if offline:
        levels = sorted(int(c) for c in offline)
        label = f"offline generate ({results['dtype']}, static batch)"
        axes[0].plot(levels, [offline[str(c)]["output_tokens_per_s"] for c in levels], "k--", marker="x", label=label)
    for ax, title in zip(
        axes[:3], ("output tokens/s", "time to first token p50 (ms)", "inter-token latency p50 (ms)"), strict=True
    ):
        ax.set_title(title)
        ax.set_xlabel("concurrent streams")
        ax.set_xticks([int(c) for c in results["gateway"]])
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    emb = results.get("embeddings")
    if emb:
        names = ["c=1 unbatched", "c=1 batched", "c=16 unbatched", "c=16 batched"]
        values = [emb["1"]["unbatched"], emb["1"]["batched"], emb["16"]["unbatched"], emb["16"]["batched"]]
        axes[3].bar(names, [v["requests_per_s"] for v in values], color=["#999", "#1f77b4", "#999", "#1f77b4"])
        axes[3].set_title("embeddings: single-sentence requests/s")
        axes[3].tick_params(axis="x", labelsize=8)
    fig.suptitle(
        f"SmolLM2-135M-Instruct, {results['max_tokens']} output tokens per request, {results['cpu']}", fontsize=10
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def cpu_model() -> str:
    """The CPU's model name and whether it runs bf16 natively: figures differ between CPU kinds."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return platform.processor() or platform.machine()
    name = next((line.partition(":")[2].strip() for line in lines if line.startswith("model name")), "")
    flags = next((line.partition(":")[2].split() for line in lines if line.startswith("flags")), [])
    native = [f for f in ("avx512_bf16", "amx_bf16") if f in flags]
    return f"{name or platform.machine()}, {'native bf16: ' + ' '.join(native) if native else 'no native bf16'}"


def arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--levels", type=int, nargs="+", default=[1, 4, 8, 16])
    parser.add_argument("--rounds", type=int, default=3, help="Interleaved rounds; medians are reported.")
    parser.add_argument("--requests-per-client", type=int, default=2)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--embedding-requests", type=int, default=320)
    parser.add_argument("--skip-transformers", action="store_true", help="Only the gateway and offline generate.")
    parser.add_argument("--skip-embeddings", action="store_true")
    parser.add_argument("--config", type=Path, help="Gateway config to measure instead of the embedded default.")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "engine_load.json")
    parser.add_argument("--no-plot", action="store_true")
    return parser.parse_args()


def chat_checkpoint(settings: Any) -> tuple[str, str]:
    """The default chat model's plain checkpoint (a GGUF converted once) and the dtype it runs in."""
    from transformers import AutoModelForCausalLM

    from gateway.engine.args import EngineArgs
    from gateway.engine.runtime.loader import checkpoint_path, pick_device, pick_dtype

    chat = EngineArgs.of(next(m for m in settings.models if m.name == CHAT_MODEL).backend)
    checkpoint, _ = checkpoint_path(chat, settings.cache_dir, AutoModelForCausalLM)
    return checkpoint, str(pick_dtype(chat.dtype, pick_device(chat.device))).removeprefix("torch.")


def measure(args: argparse.Namespace, results: dict[str, Any], tokenizer: Any) -> None:
    """Every target under load, offline generate and embeddings, into `results`."""
    checkpoint, gateway_label = results["checkpoint"], "gateway"
    # server logs and configs of this run stay in bench-results/ (git-ignored)
    tmp = ROOT / "bench-results" / time.strftime("engine-%Y%m%d-%H%M%S")
    tmp.mkdir(parents=True, exist_ok=True)
    print(f"server logs in {tmp}", flush=True)
    with ExitStack() as servers:
        port = free_port()
        url = servers.enter_context(server(gateway_cmd(port, args.config), port, "/ready", tmp / "gateway.log"))
        targets = {gateway_label: (url, CHAT_MODEL)}
        if not args.skip_transformers:
            for label, tf_dtype in ((TF_BF16, "bfloat16"), (TF_DEFAULT, None)):
                log_path = tmp / f"transformers-{tf_dtype or 'default'}.log"
                url = servers.enter_context(transformers_server(checkpoint, tf_dtype, log_path))
                targets[label] = (url, checkpoint)  # it serves only the checkpoint it was started with
        measured = drive(targets, args.levels, args.rounds, args.requests_per_client, args.max_tokens, tokenizer)
        servers.close()
        results["gateway"] = measured.pop(gateway_label)
        results["targets"] = measured
        results["offline_generate"] = offline_generate(checkpoint, results["dtype"], args.levels, args.max_tokens)
        if not args.skip_embeddings:
            results["embeddings"] = embeddings(tmp, args.embedding_requests, args.rounds)


def main() -> None:
    args = arguments()
    from transformers import AutoTokenizer

    from gateway.config import load_settings

    settings = load_settings(args.config)
    checkpoint, dtype = chat_checkpoint(settings)
    results: dict[str, Any] = {
        "command": "python bench/engine_load.py " + " ".join(sys.argv[1:]),
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "cpu": f"{os.cpu_count()} CPU cores, {cpu_model()}",
        "dtype": dtype,
        "max_tokens": args.max_tokens,
        "rounds": args.rounds,
        "requests_per_client": args.requests_per_client,
        "checkpoint": checkpoint,
        "targets": {},
    }
    print(f"gateway default chat model in {dtype}; checkpoint {checkpoint}", flush=True)
    measure(args, results, AutoTokenizer.from_pretrained(checkpoint))
    embed_spec = next(m for m in settings.models if m.name == EMBED_MODEL).backend
    results["checks"] = checks(results, embed_spec.max_wait_ms)
    print("\nchecks:")
    for row in results["checks"]:
        print(f"  [{'ok' if row['ok'] else 'MISSED'}] {row['check']}: {row['value']}")
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {args.out}")
    if not args.no_plot:
        png = args.out.with_suffix(".png")
        plot(results, png)
        print(f"wrote {png}")


if __name__ == "__main__":
    main()

"""Do the README's examples and the e2e tests' prompts have answers that hold on every CPU?

For each prompt: the default model's greedy answer in float32 (fused path, what `auto` picks on a
CPU without native bf16), the smallest margin between the top two log-probabilities over the
generated tokens, and whether the bfloat16 answer (what `auto` picks with AVX512-BF16/AMX) is the
same. A margin under MIN_MARGIN is a near-tie that bf16 rounding or another CPU's kernels can flip
(bf16 log-probabilities differ from float32 by up to about 0.3 here): such a prompt is a lucky one.

    PYTHONPATH=. python bench/check_examples.py [--extra "question" ...]
"""

from __future__ import annotations

import argparse
import platform
import subprocess

import torch

from tests.engine import numerics

MIN_MARGIN = 0.5
# (kind, prompt, max new tokens): the README's examples and the e2e tests' prompts.
EXAMPLES = [
    ("chat", "What is the capital of Japan?", 24),
    ("chat", "What is the capital of Japan?", 4),
    ("completion", "The capital of Japan is", 5),
    ("completion", "The capital of Japan is", 3),
    ("chat", "What is the capital of France?", 24),  # the examples' former question: a near-tie
    ("chat", "Say hello.", 4),
    ("completion", "The capital of France is", 8),
    ("completion", "Can you please let us know more details about your ", 20),
    ("completion", "Once upon a time", 20),
    ("chat", "Name three colours.", 24),
    ("chat", "Write a haiku about the sea.", 24),
    ("chat", "What is 2 + 2?", 24),
    ("chat", "Give me a tip for learning Python.", 24),
    ("chat", "Who wrote Romeo and Juliet?", 24),
]


def cpu() -> str:
    for line in subprocess.run(["lscpu"], capture_output=True, text=True).stdout.splitlines():
        if line.startswith("Model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--extra", nargs="*", default=[], help="more chat questions to try")
    args = parser.parse_args()
    examples = EXAMPLES + [("chat", q, 24) for q in args.extra]
    print(f"CPU: {cpu()}; dtype auto here: {numerics.auto_dtype()}; near-tie below {MIN_MARGIN}")
    runs = {}
    for dtype in (torch.float32, torch.bfloat16):
        tokenizer, step = numerics.load(dtype)
        eos = frozenset({tokenizer.eos_token_id})
        runs[dtype] = []
        for kind, prompt, new in examples:
            ids = numerics.chat_ids(tokenizer, prompt) if kind == "chat" else numerics.completion_ids(tokenizer, prompt)
            tokens, margins = numerics.greedy(step, ids, new, eos if kind == "chat" else frozenset())
            runs[dtype].append((tokenizer.decode([t for t in tokens if t not in eos]), margins))
    print("| kind | prompt | float32 answer | min margin (at token) | bf16 answer same | verdict |")
    print("|---|---|---|---|---|---|")
    for (kind, prompt, _), (text, margins), (text16, _) in zip(
        examples, runs[torch.float32], runs[torch.bfloat16], strict=True
    ):
        low = min(range(len(margins)), key=margins.__getitem__)
        verdict = (
            "ok"
            if margins[low] >= MIN_MARGIN and text == text16
            else "NEAR-TIE"
            if margins[low] < MIN_MARGIN
            else "DIFFERS"
        )
        same = "yes" if text == text16 else f"no: {text16!r}"
        print(f"| {kind} | {prompt!r} | {text!r} | {margins[low]:.3f} ({low}) | {same} | {verdict} |")


if __name__ == "__main__":
    main()

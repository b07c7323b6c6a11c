"""What float32 logits cost on the fused path: decode-step time of SmolLM2-135M in bf16 at 1 and 16
streams with the head as the engine runs it now (float16 weights, float32 arithmetic: `LogitsLinear`),
with a float32 copy of the head (issue 10) and with a bf16 head whose output is rounded to bf16 (before).
The two heads alternate run by run in one process (so load from elsewhere hits both alike); medians.

    PYTHONPATH=. python bench/logits_cost.py
"""

from __future__ import annotations

import torch

from bench.single_stream import step_times
from gateway.engine.generation.step import PrefillChunk, StepPlan
from gateway.engine.runtime.packed import PackedLinear
from tests.engine import numerics

STEPS, RUNS, SLOTS = 20, 9, 16


def main() -> None:
    _, step = numerics.load(torch.bfloat16, slots=SLOTS)
    _, plain = numerics.load(torch.bfloat16, fused=None)
    head_now = step.head  # float16 weights, float32 arithmetic, where exact (issue 17)
    head32 = PackedLinear(plain.get_output_embeddings().weight.detach().float(), None, SLOTS)
    head16 = PackedLinear(plain.get_output_embeddings().weight.detach(), None, SLOTS)
    variants = {
        f"head now: {head_now.kind}": lambda x: head_now(step._rms(x, step.norm)),
        "float32 copy (issue 10)": lambda x: head32(step._rms(x, step.norm)),
        "bf16 head, rounded (before)": lambda x: head16(step._rms(x, step.norm).to(torch.bfloat16)).float(),
    }
    print(f"CPU: {__import__('bench.check_examples', fromlist=['cpu']).cpu()}, {torch.get_num_threads()} threads")
    for streams in (1, 16):
        for slot in range(streams):
            step.forward(StepPlan(prefills=[PrefillChunk(slot, 0, list(range(10, 50)), True)]))
        plan = StepPlan(
            decode_slots=list(range(streams)), decode_tokens=[100] * streams, decode_positions=[40] * streams
        )
        times = step_times(step, plan, variants, STEPS, RUNS, attribute="_logits")
        for name, ms in times.items():
            print(f"{streams:2d} streams  {name:52s} {ms:6.2f} ms/step  {streams * 1e3 / ms:6.0f} tok/s")


if __name__ == "__main__":
    main()

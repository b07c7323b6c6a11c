"""The fused path's decode step through `torch.compile` (opt-in: the engine setting `compile`).

A decode step of one stream spends beyond its matmuls ~25 small operations a layer (norms, casts,
RoPE, SiLU, residual adds), each a Python call and a kernel launch. Inductor fuses them into a few
generated C++ loops per layer and calls the step as one graph, with no Python between operations.

- Only decode-only steps whose sequences sit in slots 0..n-1 (the scheduler hands out the lowest
  free slot first, so a running batch is dense) take this path; prompt chunks, `score` and the
  rare scattered batch run the eager step (`FusedLlama._residual`).
- The weights are the fused model's own tensors (oneDNN-prepacked linears included), registered
  as buffers of `_Layers` and frozen (inductor's `freezing`, set while the warm-up compiles, with
  `cpp_wrapper`): inductor sees them as constants, which its
  oneDNN linear lowering requires, and keeps calling the prepacked kernels. Nothing is copied.
- Shapes: `dynamic=True` from the first compile, so the number of rows, the KV span and the
  cache's capacity are symbols: one graph per kind of step (one row without a mask; several rows,
  always with a mask), both compiled at load (`warm_up`). After that the stance is
  "eager on recompile": a step that would need a new graph runs `_Layers.forward` eagerly instead,
  so serving never waits for a compile and the graphs are capped at what the warm-up made. Such
  steps are counted apart (`eager_steps`, the first one logged): `_Layers.forward` counts the calls
  that ran its Python, which a compiled graph never does.
- Compiling happens on the loading thread, which runs one OpenMP thread (device.py), but for the
  compute thread's count of threads: dynamo guards on torch's thread count, so graphs compiled for
  one thread would fit no step of a compute thread running two (every step ran eagerly). Steps run
  on a thread with another count (the engine's load-time check on the loading thread) take the eager
  step.
- Any failure (no C++ compiler, an operation inductor cannot lower, a fault at run time) logs one
  warning and turns the compiled step off for good: the eager step serves on.

CUDA graphs (`mode="reduce-overhead"`) are not used: the KV span grows every step, and a CUDA graph
is recorded per shape, so it would need the span bucketed; not done without a GPU to measure on.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import torch
import torch.nn.functional as F
from torch._inductor import config as inductor_config
from torch.fx.experimental import _config as shapes_config

from gateway.engine.generation.step import StepPlan
from gateway.engine.runtime.device import compute_threads

log = logging.getLogger(__name__)

# the graph's host code as compiled C++ rather than Python: SmolLM2 bf16, one thread, one row,
# 21.7 ms a step against 22.8 (eager 27.2); checking only the guards that tell the graphs apart
# (`skip_guard_eval_unsafe`) saved under 0.2 ms more, so all guards are checked
CPP_WRAPPER = True


class _Layers(torch.nn.Module):
    """Embedding and decoder layers of a fused model for decode rows in dense slots; weights as buffers."""

    def __init__(self, fused: Any) -> None:
        super().__init__()
        self.dims = (fused.heads, fused.kv_heads, fused.head_dim, fused.group)
        self.eps, self.dtype, self.count = fused.eps, fused.dtype, fused.layers_n
        self.register_buffer("embed", fused.embed, persistent=False)
        self.register_buffer("cos", fused.rope.real.contiguous(), persistent=False)
        self.register_buffer("sin", fused.rope.imag.contiguous(), persistent=False)
        self.packed: dict[str, bool] = {}
        self.eager_runs = 0  # calls that ran this Python eagerly, not a compiled graph
        for i, w in enumerate(fused.layers):
            for name in ("ln_in", "ln_post", "q_norm", "k_norm"):
                if w[name] is not None:
                    self.register_buffer(f"{name}{i}", w[name], persistent=False)
            for name in ("qkv", "o", "gate_up", "down"):
                self.register_buffer(f"{name}{i}", w[name].weight, persistent=False)
                if w[name].bias is not None:
                    self.register_buffer(f"{name}_bias{i}", w[name].bias, persistent=False)
                self.packed[name] = w[name].packed

    def _buffer(self, name: str) -> torch.Tensor:
        value: torch.Tensor = getattr(self, name)
        return value

    def _linear(self, x: torch.Tensor, name: str, i: int) -> torch.Tensor:
        weight, bias = getattr(self, f"{name}{i}"), getattr(self, f"{name}_bias{i}", None)
        if self.packed[name]:
            return torch.ops.mkldnn._linear_pointwise(x.contiguous(), weight, bias, "none", [], "")
        return F.linear(x, weight, bias)

    def _rms(self, x: torch.Tensor, name: str) -> torch.Tensor:
        return F.rms_norm(x, (x.shape[-1],), getattr(self, name), self.eps)

    def forward(
        self,
        tokens: torch.Tensor,
        positions: torch.Tensor,
        length: int,
        mask: torch.Tensor | None,
        keys: list[torch.Tensor],
        values: list[torch.Tensor],
    ) -> torch.Tensor:
        """The final float32 residual stream of rows 0..n-1 (slot i decodes `tokens[i]` at `positions[i]`)."""
        if not torch.compiler.is_compiling():  # a constant True when traced: only an eager run counts
            self.eager_runs += 1
        heads, kv_heads, head_dim, group = self.dims
        n, dtype = tokens.shape[0], self.dtype
        slots = torch.arange(n, device=tokens.device)
        cos, sin = self._buffer("cos")[positions].unsqueeze(1), self._buffer("sin")[positions].unsqueeze(1)
        x = F.embedding(tokens, self._buffer("embed")).float()
        split = (heads + kv_heads) * head_dim
        for i in range(self.count):
            qkv = self._linear(self._rms(x, f"ln_in{i}").to(dtype), "qkv", i)
            qk = qkv[:, :split].reshape(n, heads + kv_heads, head_dim).float()
            if hasattr(self, f"q_norm{i}"):
                qk = torch.cat((self._rms(qk[:, :heads], f"q_norm{i}"), self._rms(qk[:, heads:], f"k_norm{i}")), 1)
            # RoPE on adjacent pairs (the fused model's row order), in real arithmetic
            pairs = qk.reshape(n, heads + kv_heads, head_dim // 2, 2)
            a, b = pairs[..., 0], pairs[..., 1]
            qk = torch.stack((a * cos - b * sin, a * sin + b * cos), -1).flatten(-2).to(dtype)
            keys[i][slots, :, positions] = qk[:, heads:]
            values[i][slots, :, positions] = qkv[:, split:].reshape(n, kv_heads, head_dim)
            q = qk[:, :heads].reshape(n, kv_heads, group, head_dim)
            attn = F.scaled_dot_product_attention(q, keys[i][:n, :, :length], values[i][:n, :, :length], attn_mask=mask)
            x = x + self._linear(attn.reshape(n, -1), "o", i)
            gate, up = self._linear(self._rms(x, f"ln_post{i}").to(dtype), "gate_up", i).chunk(2, dim=-1)
            x = x + self._linear(F.silu(gate) * up, "down", i)
        return x


class CompiledDecode:
    """The compiled decode step of one fused model, or None from `run` when a step is not for it."""

    def __init__(self, fused: Any) -> None:
        self.fused = fused
        self.layers = _Layers(fused)
        self.function = torch.compile(self.layers, dynamic=True)
        self.enabled = True
        self.compile_seconds = 0.0
        self.threads = compute_threads()  # the compute thread's, which the graphs are compiled for
        # decode steps served by a compiled graph, and those the stance ran eagerly because no graph
        # of the warm-up's fitted (the warm-up's not counted); the first such step logs a warning
        self.steps = 0
        self.eager_steps = 0

    def accepts(self, plan: StepPlan) -> bool:
        count = len(plan.decode_slots)
        return self.enabled and not plan.prefills and count > 0 and plan.decode_slots == list(range(count))

    def run(self, plan: StepPlan, *, warming: bool = False) -> torch.Tensor | None:
        """The residual stream of a dense decode-only plan, or None (then the eager step runs it)."""
        if not self.accepts(plan) or torch.get_num_threads() != self.threads:
            return None
        fused = self.fused
        cache = fused.cache
        cache.reserve(plan.longest)
        dev = fused.device
        length = max(plan.decode_positions) + 1
        lengths = torch.tensor(plan.decode_positions) + 1
        mask = None  # one row sees its whole span; several get a mask even if of one length (one graph less)
        if len(lengths) > 1:
            mask = (torch.arange(length)[None, :] < lengths[:, None]).view(-1, 1, 1, length).to(dev)
        args = (
            torch.tensor(plan.decode_tokens, device=dev),
            torch.tensor(plan.decode_positions, device=dev),
            length,
            mask,
            cache.keys,
            cache.values,
        )
        try:
            # after the warm-up a step that would need a new graph runs eagerly (`_Layers.forward`
            # as it is) instead of compiling while requests wait
            if warming:  # freezing: the weights become constants (inductor's oneDNN linears need them so);
                # read when a graph is compiled, which after the warm-up never happens. No "duck
                # sizing": it would take the warm-up's 2 rows to equal any other size 2 (a model's
                # 2 KV heads, 2 slots) and the graph would fit no step of 3 rows
                with (
                    inductor_config.patch(freezing=True, cpp_wrapper=CPP_WRAPPER),
                    shapes_config.patch(use_duck_shape=False),  # type: ignore[attr-defined]  # set up at import
                ):
                    out: torch.Tensor = self.function(*args)
                return out
            eager_runs = self.layers.eager_runs
            with torch.compiler.set_stance("eager_on_recompile"):
                out = self.function(*args)
            if self.layers.eager_runs == eager_runs:
                self.steps += 1
            else:
                self._ran_eagerly(len(plan.decode_slots), length)
            return out
        except Exception as exc:
            self.disable(exc)
            return None

    def warm_up(self) -> None:
        """Compile the two kinds of steps served (one row; several rows, with a mask) at load, before
        any request: slots 0 and 1, positions 0..3 (rewritten by a request before it reads them)."""
        threads = torch.get_num_threads()
        torch.set_num_threads(self.threads)  # for the graphs' guards: the loading thread's is restored
        try:
            self._compile()
        finally:
            torch.set_num_threads(threads)

    def _compile(self) -> None:
        started = time.perf_counter()
        plans = [
            StepPlan(decode_slots=[0], decode_tokens=[0], decode_positions=[3]),
            StepPlan(decode_slots=[0, 1], decode_tokens=[0, 0], decode_positions=[3, 2]),
        ]
        for plan in plans:
            if len(plan.decode_slots) <= self.fused.scratch and self.run(plan, warming=True) is None:
                return
        self.compile_seconds = time.perf_counter() - started

    def _ran_eagerly(self, rows: int, length: int) -> None:
        if not self.eager_steps:
            log.warning(
                "a decode step (%d rows, %d positions) fitted none of the compiled graphs and ran eagerly; "
                "later ones are counted, not logged",
                rows,
                length,
            )
        self.eager_steps += 1

    def disable(self, exc: BaseException) -> None:
        if self.enabled:
            log.warning(
                "torch.compile of the decode step failed (%s: %s); the eager step serves instead",
                type(exc).__name__,
                str(exc).splitlines()[0][:300] if str(exc) else "",
            )
        self.enabled = False

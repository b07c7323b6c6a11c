"""Linear layers with their weights prepacked for oneDNN, on CPUs.

`F.linear` on a plain bf16 or fp32 weight runs a kernel that, on the 2-core development
machine, reads weights at about 17 GB/s while the memory delivers 35-40 GB/s, and
repacks or falls back on every call. Reordering each weight once into oneDNN's blocked
layout (`torch.ops.mkldnn._reorder_linear_weight`, what `torch.compile` does for frozen
CPU models) and running `_linear_pointwise` gives the same results, about twice as fast
for decode-sized inputs in bf16 and two to three times as fast in fp32 (SmolLM2's 30
layers: 7.7 against 13.8 ms for 8 tokens in bf16, 14 against 32 ms in fp32).
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F

_PACKABLE = {torch.bfloat16, torch.float32}


class PackedLinear:
    """`x @ weight.T + bias`, with the weight prepacked where that works (plain `F.linear` elsewhere:
    GPUs, other dtypes, builds without oneDNN)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, batch_hint: int) -> None:
        self.weight, self.bias, self.packed = weight, bias, False
        if weight.device.type != "cpu" or weight.dtype not in _PACKABLE or not torch.backends.mkldnn.is_available():
            return
        try:
            packed = torch.ops.mkldnn._reorder_linear_weight(weight.detach(), batch_hint)
            probe = torch.ones(1, weight.shape[1], dtype=weight.dtype)
            torch.ops.mkldnn._linear_pointwise(probe, packed, bias, "none", [], "")
        except (RuntimeError, AttributeError):  # a build without these kernels
            return
        self.weight, self.packed = packed, True

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if not self.packed:
            return F.linear(x, self.weight, self.bias)
        # the packed kernel reads its input as dense: a strided view would be read wrongly
        return torch.ops.mkldnn._linear_pointwise(x.contiguous(), self.weight, self.bias, "none", [], "")


class PackedLinearModule(torch.nn.Module):
    """Drop-in for an `nn.Linear` of a loaded transformers model. It keeps the original `weight`
    and `bias` as attributes, for modelling code that reads their dtype or shape."""

    def __init__(self, linear: torch.nn.Linear, batch_hint: int) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight, self.bias = linear.weight, linear.bias
        self._linear = PackedLinear(
            linear.weight.detach(), None if linear.bias is None else linear.bias.detach(), batch_hint
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._linear(x)


def pack_linears(model: Any, batch_hint: int) -> int:
    """Replace every `nn.Linear` of a CPU model by a packed one; returns how many were packed.
    For inference only: the packed weights are copies that training would not update."""
    packed = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is torch.nn.Linear:
                module = PackedLinearModule(child, batch_hint)
                if module._linear.packed:
                    setattr(parent, name, module)
                    packed += 1
    return packed


class LogitsLinear:
    """A model's output projection computed in float32 arithmetic on a float32 input: the logits.

    When every weight of a bf16/fp16 model's head, scaled by a power of two, is exactly a float16
    number (bf16 keeps 7 mantissa bits, float16 10; the scale moves the weights away from float16's
    small range, where it would round tiny ones), the scaled weight is held as float16 and run by
    fbgemm's float16-weight GEMM (`quantized::linear_dynamic_fp16`: "dynamic" names the float32
    activations, which are not quantised), which widens each weight to float32 inside the kernel
    and accumulates in float32; the output is scaled back (exact: a power of two). The products are
    those of a float32 copy (logits differ only by summation order, ~1e-6 relative), with half the
    bytes to read: SmolLM2's head (49152 x 576) is 57 MB a decode step instead of 113. It serves
    steps of up to `HALF_ROWS` rows (a few streams decoding: where the bytes are the time); larger
    ones, and anything else (a float32 model, a weight float16 cannot hold, a build without fbgemm,
    a GPU), use the float32 copy, prepacked where `PackedLinear` can. Both copies are held: 57 MB
    more than the float32 copy alone for SmolLM2.
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, batch_hint: int) -> None:
        self.out_features = int(weight.shape[0])
        self.bias = None if bias is None else bias.detach().float()
        self.half: Any = None
        self.scale = 1.0
        weight = weight.detach()
        if weight.device.type == "cpu" and weight.dtype in (torch.bfloat16, torch.float16):
            self._pack_half(weight)
        self.full = PackedLinear(weight.float(), self.bias, batch_hint)

    def _pack_half(self, weight: torch.Tensor) -> None:
        """`weight` x 2^s as float16 for fbgemm, if that holds every value exactly (else nothing)."""
        largest = float(weight.abs().max())
        if not math.isfinite(largest):
            return
        shift = math.floor(math.log2(_FLOAT16_MAX / largest)) - 1 if largest > 0 else 0
        scaled = weight.float() * 2.0**shift
        half = scaled.to(torch.float16)
        if not torch.equal(half.float(), scaled):
            return
        bias = None if self.bias is None else self.bias * 2.0**shift
        try:
            packed = torch.ops.quantized.linear_prepack_fp16(scaled, bias)
            torch.ops.quantized.linear_dynamic_fp16(torch.ones(1, weight.shape[1]), packed)
        except (RuntimeError, AttributeError, NotImplementedError):  # a build without fbgemm
            return
        self.half, self.scale = packed, 2.0**-shift

    @property
    def kind(self) -> str:
        return "float16 weights, float32 arithmetic (fbgemm)" if self.half is not None else "float32"

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.half is None or x.shape[0] > HALF_ROWS:
            return self.full(x)
        return torch.ops.quantized.linear_dynamic_fp16(x.float().contiguous(), self.half).mul_(self.scale)


_FLOAT16_MAX = 65504.0
# fbgemm splits its float16 GEMM between threads by rows, so one row runs on one core; from a few
# rows on, the float32 copy (prepacked, every core) is as fast or faster, and its arithmetic is the same.
HALF_ROWS = 4

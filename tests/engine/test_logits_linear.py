"""The output projection's float16-weight path: same logits as a float32 copy of the head (to float32
summation-order rounding), taken only where float16 holds every weight exactly."""

from __future__ import annotations

import pytest
import torch

from gateway.engine.runtime.packed import LogitsLinear


def _reference(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    out = x.double() @ weight.double().T
    return out if bias is None else out + bias.double()


@pytest.mark.parametrize("rows", [1, 3, 16])
@pytest.mark.parametrize("with_bias", [False, True])
def test_bf16_head_runs_on_float16_weights_with_float32_logits(rows: int, with_bias: bool) -> None:
    torch.manual_seed(rows)
    weight = (torch.randn(1000, 96) * 0.05).to(torch.bfloat16)
    bias = (torch.randn(1000) * 0.1).to(torch.bfloat16) if with_bias else None
    head = LogitsLinear(weight, bias, 16)
    if head.half is None:
        pytest.skip("this torch build has no fbgemm float16 GEMM (the float32 copy is used)")
    x = torch.randn(rows, 96) * 40  # SmolLM2-sized activations: bf16 rounding of these would show
    logits = head(x)
    assert logits.dtype == torch.float32 and logits.shape == (rows, 1000)
    expected = _reference(x, weight, bias)
    # float32 arithmetic: errors of float32 summation, far below bf16's 2^-8 relative steps
    assert torch.allclose(logits.double(), expected, rtol=0, atol=1e-4 * float(expected.abs().max()))
    rounded_input = _reference(x.to(torch.bfloat16).float(), weight, bias)
    assert (logits.double() - expected).abs().max() < (rounded_input - expected).abs().max() / 20


def test_weights_that_float16_would_round_keep_a_float32_copy() -> None:
    # a span of magnitudes no power-of-two scale fits into float16's 2^-24 .. 65504
    weight = torch.tensor([[1e-9, 1.0], [1000.0, 3.0]], dtype=torch.bfloat16)
    head = LogitsLinear(weight, None, 1)
    assert head.half is None and head.kind == "float32"
    x = torch.tensor([[2.0, 0.5]])
    assert torch.allclose(head(x), x @ weight.float().T)


def test_small_weights_are_scaled_into_float16_range_exactly() -> None:
    weight = (torch.randn(64, 32) * 1e-6).to(torch.bfloat16)  # float16 alone would round most of these
    head = LogitsLinear(weight, None, 1)
    if head.half is None:
        pytest.skip("this torch build has no fbgemm float16 GEMM")
    x = torch.randn(2, 32)
    expected = _reference(x, weight, None)
    assert torch.allclose(head(x).double(), expected, rtol=0, atol=1e-5 * float(expected.abs().max()))


def test_float32_models_keep_their_float32_head() -> None:
    weight = torch.randn(8, 4)
    head = LogitsLinear(weight, None, 1)
    assert head.half is None
    x = torch.randn(2, 4)
    assert torch.allclose(head(x), x @ weight.T, atol=1e-6)

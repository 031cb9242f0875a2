"""SwiGLU activation: torch and Triton backends vs the reference Expert's silu(gate)·up."""

import pytest
import torch
import torch.nn.functional as F

from mythos_rt import reference as R
from mythos_rt.ops.ffn import swiglu, swiglu_torch
from mythos_rt.testing import (TOL_BF16_KERNEL, TOL_FP16_INTERPRET, TOL_FP32_INTERPRET,
                               TOL_FP32_TORCH, assert_rel_close)
from mythos_rt.triton_kernels.swiglu import swiglu_triton

CASES = [pytest.param(swiglu_torch, torch.float32, TOL_FP32_TORCH, id="torch-fp32"),
         pytest.param(swiglu_triton, torch.float32, TOL_FP32_INTERPRET, id="triton-fp32"),
         pytest.param(swiglu_triton, torch.float16, TOL_FP16_INTERPRET, id="triton-fp16")]


def _ref(gate_up):
    g, u = gate_up.float().chunk(2, dim=-1)
    return F.silu(g) * u


@pytest.mark.parametrize("fn,dtype,tol", CASES)
@pytest.mark.parametrize("shape", [pytest.param((1, 2 * 200), id="N1-I200"),
                                   pytest.param((37, 2 * 48), id="N37-I48"),
                                   pytest.param((3, 5, 2 * 1500), id="B3xT5-I1500_multiblock")])
def test_swiglu(fn, dtype, tol, shape):
    gu = (3 * torch.randn(shape)).to(dtype)  # wide range: both silu tails
    ref = _ref(gu)
    assert_rel_close(fn(gu), ref, tol)
    out = torch.full(ref.shape, float("nan"), dtype=dtype)
    assert fn(gu, out=out) is out
    assert_rel_close(out, ref, tol)


def test_swiglu_matches_reference_expert():
    """swiglu over a fused [gate | up] projection reproduces reference.Expert."""
    ex = R.Expert(48, 40)
    x = torch.randn(37, 48)
    with torch.no_grad():
        gu = torch.cat([ex.gate(x), ex.up(x)], dim=-1)
        ref = ex(x)
        for fn, tol in ((swiglu_torch, TOL_FP32_TORCH), (swiglu_triton, TOL_FP32_INTERPRET)):
            assert_rel_close(ex.down(fn(gu)), ref, tol)


def test_swiglu_strided_and_errors():
    buf = torch.randn(7, 130)
    gu = buf[:, 10:110]  # (7, 100) row stride 130
    assert_rel_close(swiglu_triton(gu), _ref(gu), TOL_FP32_INTERPRET)
    assert torch.equal(swiglu(gu), swiglu_torch(gu))
    with pytest.raises(ValueError):
        swiglu_triton(torch.randn(3, 7))
    with pytest.raises(ValueError):
        swiglu_triton(torch.randn(3, 8), out=torch.empty(3, 3))  # narrower than I = 4
    with pytest.raises(ValueError):
        swiglu_triton(torch.randn(3, 8), out=torch.empty(2, 4))


@pytest.mark.parametrize("fn,dtype,tol", CASES)
def test_an_out_wider_than_i_gets_zeros_past_i(fn, dtype, tol):
    """The ``act`` of a padded FFN (``ops.ffn.align_hidden``): I = 90 of a row 128 wide
    (gate_up itself a slice of a wider buffer), the padding columns zero, not left as
    they were."""
    buf = (3 * torch.randn(5, 256)).to(dtype)
    gu = buf[:, :180]
    out = torch.full((5, 128), float("nan"), dtype=dtype)
    assert fn(gu, out=out) is out
    assert_rel_close(out[:, :90], _ref(gu), tol)
    assert not out[:, 90:].any()


@pytest.mark.gpu
@pytest.mark.parametrize("shape", [(1, 2 * 2048), (8191, 2 * 1365), (64, 2 * 200)])
def test_gpu_swiglu_bf16(shape):
    gu = (3 * torch.randn(shape, device="cuda")).bfloat16()
    assert_rel_close(swiglu_triton(gu), _ref(gu), TOL_BF16_KERNEL)

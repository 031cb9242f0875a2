"""The dense_ffn op (Prelude/Coda SwiGLU FFN): torch and Triton (interpreted) backends vs
the reference Expert module, with and without the plan's intermediate buffers."""

import pytest
import torch

from mythos_rt import reference as R
from mythos_rt.ops import backends_of
from mythos_rt.ops.ffn import DenseFFN, dense_ffn_torch, dense_ffn_triton
from mythos_rt.testing import (TOL_FP16_INTERPRET, TOL_FP32_INTERPRET, TOL_FP32_TORCH,
                               assert_rel_close)


def make_ffn(D: int, H: int, dtype=torch.float32):
    ex = R.Expert(D, H)
    w = DenseFFN(w13=torch.cat([ex.gate.weight, ex.up.weight]).detach().to(dtype).contiguous(),
                 down=ex.down.weight.detach().to(dtype).contiguous())
    return ex, w


def test_backends():
    assert backends_of("dense_ffn") == ["torch", "triton", "cpu"]


@pytest.mark.parametrize("fn,dtype,tol", [
    pytest.param(dense_ffn_torch, torch.float32, TOL_FP32_TORCH, id="torch-fp32"),
    pytest.param(dense_ffn_triton, torch.float32, TOL_FP32_INTERPRET, id="triton-fp32"),
    pytest.param(dense_ffn_triton, torch.float16, TOL_FP16_INTERPRET, id="triton-fp16")])
@pytest.mark.parametrize("N,D,H", [(1, 40, 37), (13, 48, 64)])
def test_dense_ffn_matches_reference_expert(fn, dtype, tol, N, D, H):
    ex, w = make_ffn(D, H, dtype)
    x = torch.randn(N, D)
    with torch.no_grad():
        ref = ex(x.to(dtype).float())
    assert_rel_close(fn(x.to(dtype), w), ref, tol)
    out = torch.full((N, D), float("nan"), dtype=dtype)
    gate_up, act = torch.empty(N, 2 * H, dtype=dtype), torch.empty(N, H, dtype=dtype)
    assert fn(x.to(dtype), w, out=out, gate_up=gate_up, act=act) is out
    assert_rel_close(out, ref, tol)

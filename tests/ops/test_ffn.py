"""The dense_ffn op (Prelude/Coda SwiGLU FFN): torch and Triton (interpreted) backends vs
the reference Expert module, with and without the plan's intermediate buffers."""

import pytest
import torch

from mythos_rt import reference as R
from mythos_rt.ops import backends_of
from mythos_rt.config import MythosConfig
from mythos_rt.lower import op_args
from mythos_rt.ops.ffn import dense_ffn_torch, dense_ffn_triton
from mythos_rt.testing import (TOL_FP16_INTERPRET, TOL_FP32_INTERPRET, TOL_FP32_TORCH,
                               assert_rel_close)


def make_ffn(D: int, dtype=torch.float32):
    """A reference Prelude FFN of width D (hidden D·4//3) and the lowering's DenseFFN of it."""
    cfg = MythosConfig(dim=D)
    ex = R.Expert(D, cfg.dense_hidden)
    return ex, op_args("dense_ffn", ex.state_dict(), cfg, dtype=dtype)


def test_backends():
    assert backends_of("dense_ffn") == ["torch", "triton", "cpu"]


@pytest.mark.parametrize("fn,dtype,tol", [
    pytest.param(dense_ffn_torch, torch.float32, TOL_FP32_TORCH, id="torch-fp32"),
    pytest.param(dense_ffn_triton, torch.float32, TOL_FP32_INTERPRET, id="triton-fp32"),
    pytest.param(dense_ffn_triton, torch.float16, TOL_FP16_INTERPRET, id="triton-fp16")])
@pytest.mark.parametrize("N,D", [(1, 40), (13, 48)])  # hidden 53 (prime), 64
def test_dense_ffn_matches_reference_expert(fn, dtype, tol, N, D):
    ex, w = make_ffn(D, dtype)
    H = w.down.shape[1]
    x = torch.randn(N, D)
    with torch.no_grad():
        ref = ex(x.to(dtype).float())
    assert_rel_close(fn(x.to(dtype), w), ref, tol)
    out = torch.full((N, D), float("nan"), dtype=dtype)
    gate_up, act = torch.empty(N, 2 * H, dtype=dtype), torch.empty(N, H, dtype=dtype)
    assert fn(x.to(dtype), w, out=out, gate_up=gate_up, act=act) is out
    assert_rel_close(out, ref, tol)

"""RMSNorm (+ fused residual add): torch and Triton backends vs mythos_rt.reference.RMSNorm."""

import pytest
import torch

from mythos_rt import reference as R
from mythos_rt.ops.norm import rmsnorm, rmsnorm_torch
from mythos_rt.testing import (TOL_BF16_KERNEL, TOL_FP16_INTERPRET, TOL_FP32_INTERPRET,
                               TOL_FP32_TORCH, assert_rel_close)
from mythos_rt.triton_kernels.rmsnorm import rmsnorm_triton

CASES = [pytest.param(rmsnorm_torch, torch.float32, TOL_FP32_TORCH, id="torch-fp32"),
         pytest.param(rmsnorm_triton, torch.float32, TOL_FP32_INTERPRET, id="triton-fp32"),
         pytest.param(rmsnorm_triton, torch.float16, TOL_FP16_INTERPRET, id="triton-fp16")]
SHAPES = [pytest.param((1, 200), id="N1-D200"), pytest.param((37, 48), id="N37-D48"),
          pytest.param((2, 7, 200), id="B2xT7-D200")]


def _ref_norm(x, w):
    mod = R.RMSNorm(x.shape[-1])
    with torch.no_grad():
        mod.weight.copy_(w)
        return mod(x)


@pytest.mark.parametrize("fn,dtype,tol", CASES)
@pytest.mark.parametrize("shape", SHAPES)
def test_rmsnorm(fn, dtype, tol, shape):
    x = torch.randn(shape).to(dtype)
    w = (1 + 0.5 * torch.randn(shape[-1])).to(dtype)
    ref = _ref_norm(x.float(), w.float())
    assert_rel_close(fn(x, w), ref, tol)
    out = torch.full_like(x, float("nan"))
    assert fn(x, w, out=out) is out
    assert_rel_close(out, ref, tol)


@pytest.mark.parametrize("fn,dtype,tol", CASES)
@pytest.mark.parametrize("shape", SHAPES)
def test_rmsnorm_fused_residual(fn, dtype, tol, shape):
    x, r = (torch.randn(shape).to(dtype) for _ in range(2))
    w = (1 + 0.5 * torch.randn(shape[-1])).to(dtype)
    s_ref = x.float() + r.float()
    y, s = fn(x, w, residual=r)
    assert_rel_close(s, s_ref, tol, "residual sum")
    assert_rel_close(y, _ref_norm(s_ref, w.float()), tol, "normed")
    # in place: the residual stream updated where it lives, the output over x
    r2, x2 = r.clone(), x.clone()
    y2, s2 = fn(x2, w, residual=r2, out=x2, residual_out=r2)
    assert y2 is x2 and s2 is r2
    assert torch.equal(s2, s) and torch.equal(y2, y)


def test_rmsnorm_triton_strided_rows():
    """A row-strided 2-D view (a slice of a wider buffer) is read and written in place."""
    buf = torch.randn(9, 300)
    x = buf[:, 50:250]  # (9, 200), row stride 300
    w = torch.randn(200)
    out_buf = torch.zeros(9, 300)
    rmsnorm_triton(x, w, out=out_buf[:, 100:])
    assert_rel_close(out_buf[:, 100:], _ref_norm(x, w), TOL_FP32_INTERPRET)
    assert not out_buf[:, :100].any()


def test_rmsnorm_dispatch_and_errors():
    x, w = torch.randn(3, 48), torch.randn(48)
    assert torch.equal(rmsnorm(x, w, backend="torch"), rmsnorm_torch(x, w))
    with pytest.raises(ValueError):
        rmsnorm_triton(x, torch.randn(47))
    with pytest.raises(ValueError):
        rmsnorm_triton(x, w, residual=torch.randn(4, 48))


@pytest.mark.gpu
@pytest.mark.parametrize("shape", [(1, 2048), (8191, 3072), (64, 200)])
def test_gpu_rmsnorm_bf16(shape):
    x, r = (torch.randn(shape, device="cuda").bfloat16() for _ in range(2))
    w = (1 + 0.5 * torch.randn(shape[-1], device="cuda")).bfloat16()
    y, s = rmsnorm_triton(x, w, residual=r)
    s_ref = x.float() + r.float()
    assert_rel_close(s, s_ref, TOL_BF16_KERNEL)
    assert_rel_close(y, _ref_norm(s_ref.cpu(), w.float().cpu()), TOL_BF16_KERNEL)
    assert_rel_close(rmsnorm_triton(x, w), _ref_norm(x.float().cpu(), w.float().cpu()),
                     TOL_BF16_KERNEL)

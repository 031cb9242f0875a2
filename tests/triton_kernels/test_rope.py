"""Triton RoPE + cache-write kernels vs the torch implementations."""

import pytest
import torch

from mythos_rt.ops import attention as A
from mythos_rt.testing import TOL_FP16_INTERPRET, TOL_FP32_INTERPRET, assert_rel_close
from mythos_rt.triton_kernels import rope as R



@pytest.mark.parametrize("dtype,tol", [(torch.float32, TOL_FP32_INTERPRET),
                                       (torch.float16, TOL_FP16_INTERPRET)], ids=["fp32", "fp16"])
def test_rope_cache_write_guard(dtype, tol):
    B, T, Hkv, d, S = 2, 5, 3, 10, 12
    cos, sin = A.rope_tables(d, S, 10000.0)
    k, v = torch.randn(B, T, Hkv, d).to(dtype), torch.randn(B, T, Hkv, d).to(dtype)
    lens = torch.tensor([0, 9], dtype=torch.int32)  # row 1 runs past S_max
    caches = [torch.full((B + 1, S, Hkv, d), float("nan"), dtype=dtype) for _ in range(4)]
    A.rope_cache_write(k, cos, sin, lens, caches[0], v, caches[1])
    R.rope_cache_write(k, cos, sin, lens, caches[2], v, caches[3])
    for ref, out in ((caches[0], caches[2]), (caches[1], caches[3])):
        assert torch.equal(torch.isnan(ref), torch.isnan(out))
        assert_rel_close(out.nan_to_num(0.0), ref.nan_to_num(0.0), tol)
    assert torch.isnan(caches[2][2]).all() and torch.isfinite(caches[2][1, 9:]).all()
    assert torch.equal(caches[3][0, :T], v[0])  # V is copied, not rotated


@pytest.mark.parametrize("dtype,tol", [(torch.float32, TOL_FP32_INTERPRET),
                                       (torch.float16, TOL_FP16_INTERPRET)], ids=["fp32", "fp16"])
def test_mla_cache_write(dtype, tol):
    B, T, Rk, P, S = 2, 3, 24, 8, 10
    cos, sin = A.rope_tables(P, S, 10000.0)
    kv_raw = (torch.randn(B, T, Rk + P) * 3).to(dtype)
    w = (torch.randn(Rk) * 0.3 + 1).to(dtype)
    lens = torch.tensor([4, 8], dtype=torch.int32)
    ref = [torch.full((B, S, Rk), float("nan"), dtype=dtype),
           torch.full((B, S, P), float("nan"), dtype=dtype)]
    out = [r.clone() for r in ref]
    A.mla_cache_write(kv_raw.float(), w.float(), 1e-6, cos, sin, lens, *ref)
    R.mla_cache_write(kv_raw, w, 1e-6, cos, sin, lens, *out)
    for r, o in zip(ref, out):
        assert torch.equal(torch.isnan(r), torch.isnan(o))
        assert_rel_close(o.nan_to_num(0.0), r.nan_to_num(0.0), tol)

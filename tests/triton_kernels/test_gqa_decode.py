"""Triton GQA decode (split-KV + combine) vs the torch implementation."""

import pytest
import torch

from mythos_rt.ops import attention as A
from mythos_rt.testing import (TOL_BF16_KERNEL, TOL_FP16_INTERPRET, TOL_FP32_INTERPRET,
                               assert_rel_close)
from mythos_rt.triton_kernels.gqa_decode import gqa_decode



def _inputs(B, H, Hkv, d, S_max, lens, dtype=torch.float32, device="cpu"):
    k = torch.randn(B + 1, S_max, Hkv, d, device=device).to(dtype)
    v = torch.randn(B + 1, S_max, Hkv, d, device=device).to(dtype)
    for b, n in enumerate(lens):
        k[b, n:] = float("nan")
        v[b, n:] = float("nan")
    return (torch.randn(B, H, d, device=device).to(dtype), k, v,
            torch.tensor(lens, dtype=torch.int32, device=device))


@pytest.mark.parametrize("H,Hkv", [(4, 2), (3, 1), (4, 4)], ids=["gqa", "mqa-H3", "mha"])
@pytest.mark.parametrize("num_splits", [1, 3])
def test_groups_and_splits(H, Hkv, num_splits):
    q, k, v, lens = _inputs(3, H, Hkv, 10, 37, [37, 1, 20])
    ref = A.gqa_decode(q, k, v, lens, 10 ** -0.5)
    out = gqa_decode(q, k, v, lens, 10 ** -0.5, num_splits=num_splits)
    assert_rel_close(out, ref, TOL_FP32_INTERPRET)


def test_head_dim_read_as_two_key_tiles():
    """d=48 reads the key as tiles of 32 + 16 (split_kv.tiles); V stays one tile."""
    q, k, v, lens = _inputs(2, 4, 2, 48, 40, [40, 9])
    ref = A.gqa_decode(q, k, v, lens, 48 ** -0.5)
    assert_rel_close(gqa_decode(q, k, v, lens, 48 ** -0.5, num_splits=2), ref, TOL_FP32_INTERPRET)


def test_fp16_default_splits():
    q, k, v, lens = _inputs(2, 4, 2, 16, 64, [64, 33], torch.float16)
    ref = A.gqa_decode(q.float(), k.float(), v.float(), lens, 0.25)
    assert_rel_close(gqa_decode(q, k, v, lens, 0.25), ref, TOL_FP16_INTERPRET)
    assert_rel_close(gqa_decode(q, k, v, lens, 0.25, num_splits=4), ref, TOL_FP16_INTERPRET)


@pytest.mark.gpu
@pytest.mark.parametrize("B,S", [(1, 1024), (8, 8192), (2, 32768)])
def test_bf16_gpu_long(B, S):
    q, k, v, lens = _inputs(B, 16, 4, 128, S, [S - 3 * b for b in range(B)], torch.bfloat16,
                            "cuda")
    ref = A.gqa_decode(q.float(), k.float(), v.float(), lens, 128 ** -0.5)
    for ns in (1, None):
        assert_rel_close(gqa_decode(q, k, v, lens, 128 ** -0.5, num_splits=ns), ref,
                         TOL_BF16_KERNEL, f"num_splits={ns}")

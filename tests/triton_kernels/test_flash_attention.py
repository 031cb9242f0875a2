"""Triton flash attention (prefill / chunked prefill, GQA) vs the torch implementation."""

import pytest
import torch

from mythos_rt.ops import attention as A
from mythos_rt.testing import (TOL_BF16_KERNEL, TOL_FP16_INTERPRET, TOL_FP32_INTERPRET,
                               assert_rel_close)
from mythos_rt.triton_kernels.flash_attention import flash_attention, split_dim



def _inputs(B, T, H, Hk, S, dqk, dv, dtype=torch.float32, device="cpu"):
    mk = lambda *s: torch.randn(*s, device=device).to(dtype)  # noqa: E731
    return mk(B, T, H, dqk), mk(B, S, Hk, dqk), mk(B, S, Hk, dv)


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
@pytest.mark.parametrize("B,T,H,Hk,S,dqk,dv", [
    (2, 7, 3, 3, 40, 20, 10),   # T=7, H=3, dqk=20 (16 + 4 split), dv=10
    (2, 9, 4, 2, 64, 24, 16),   # GQA groups of 2
    (1, 70, 2, 1, 75, 16, 16),  # several query blocks, MQA
])
def test_offsets_and_awkward_sizes(causal, B, T, H, Hk, S, dqk, dv):
    q, k, v = _inputs(B, T, H, Hk, S, dqk, dv)
    q_start = torch.randint(0, S - T + 1, (B,), dtype=torch.int32)
    kv_len = q_start + T
    for b in range(B):
        k[b, int(kv_len[b]):] = float("nan")
        v[b, int(kv_len[b]):] = float("nan")
    ref = A.flash_attention(q, k, v, q_start, kv_len, 0.3, causal)
    assert_rel_close(flash_attention(q, k, v, q_start, kv_len, 0.3, causal), ref,
                     TOL_FP32_INTERPRET)


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
@pytest.mark.parametrize("num_splits", [2, 5])
def test_key_range_splits(causal, num_splits):
    """Split key ranges merged by the combine: GQA groups of 3 packed into query blocks,
    rows at different offsets, a non-contiguous ``out`` (combined through a copy)."""
    B, T, H, Hk, S = 2, 13, 6, 2, 90
    q, k, v = _inputs(B, T, H, Hk, S, 24, 12)
    q_start = torch.tensor([77, 20], dtype=torch.int32)
    kv_len = q_start + T
    k[1, int(kv_len[1]):] = float("nan")
    v[1, int(kv_len[1]):] = float("nan")
    out = torch.empty(T, B, H, 12).transpose(0, 1)
    flash_attention(q, k, v, q_start, kv_len, 0.3, causal, out=out, num_splits=num_splits)
    assert_rel_close(out, A.flash_attention(q, k, v, q_start, kv_len, 0.3, causal),
                     TOL_FP32_INTERPRET)


def test_query_without_keys_gives_zeros():
    q, k, v = _inputs(2, 4, 2, 2, 8, 16, 16)
    q_start = torch.tensor([0, 2], dtype=torch.int32)
    kv_len = torch.tensor([0, 6], dtype=torch.int32)
    out = flash_attention(q, k, v, q_start, kv_len, 0.25)
    assert torch.equal(out[0], torch.zeros_like(out[0]))
    assert_rel_close(out, A.flash_attention(q, k, v, q_start, kv_len, 0.25), TOL_FP32_INTERPRET)


def test_fp16():
    q, k, v = _inputs(2, 11, 4, 2, 30, 32, 16, torch.float16)
    q_start = torch.tensor([19, 3], dtype=torch.int32)
    kv_len = q_start + 11
    ref = A.flash_attention(q.float(), k.float(), v.float(), q_start, kv_len, 0.2)
    assert_rel_close(flash_attention(q, k, v, q_start, kv_len, 0.2), ref, TOL_FP16_INTERPRET)


def test_tile_config_counts_only_present_key_parts():
    """GQA d=128 has one key part: the 128x64 tiles on 8 warps, not the wide ones."""
    from mythos_rt.triton_kernels.flash_attention import tile_config
    assert tile_config(128, 0, 128, 4096) == (128, 64, 8)
    assert tile_config(64, 32, 64, 4096) == (128, 64, 8)     # MLA 1b: nope 64 + rope 32
    assert tile_config(128, 64, 128, 4096) == (64, 32, 4)    # 128 + 64 is wide
    assert tile_config(96, 32, 96, 4096) == (64, 32, 4)      # 3b: pow2(96) = 128 + 32
    assert tile_config(128, 0, 128, 7) == (16, 64, 4)        # a short chunk: small M
    assert tile_config(256, 32, 256, 4096) == (64, 32, 8)    # 1b latent: R 256 + rope 32
    assert tile_config(512, 32, 512, 4096) == (32, 32, 8)    # 3b latent: pow2(384) = 512


def test_split_dim():
    assert [split_dim(d) for d in (10, 16, 20, 64, 96, 128, 192)] == [10, 16, 16, 64, 64, 128, 128]


@pytest.mark.gpu
@pytest.mark.parametrize("T,dqk,dv", [(1024, 96, 64), (8192, 128, 128), (4096, 192, 128)])
def test_bf16_gpu_long(T, dqk, dv):
    B, H, Hk = 1, 16, 4
    q, k, v = _inputs(B, T, H, Hk, T, dqk, dv, torch.bfloat16, "cuda")
    zeros = torch.zeros(B, dtype=torch.int32, device="cuda")
    kv_len = zeros + T
    ref = A.flash_attention(q[:, -256:].float(), k.float(), v.float(), zeros + T - 256, kv_len,
                            dqk ** -0.5)
    out = flash_attention(q, k, v, zeros, kv_len, dqk ** -0.5)
    assert_rel_close(out[:, -256:], ref, TOL_BF16_KERNEL)

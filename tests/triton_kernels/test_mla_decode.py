"""Triton absorbed MLA decode (split-KV + combine) vs the torch implementation."""

import pytest
import torch

from mythos_rt.ops import attention as A
from mythos_rt.testing import (TOL_BF16_KERNEL, TOL_FP16_INTERPRET, TOL_FP32_INTERPRET,
                               assert_rel_close)
from mythos_rt.triton_kernels.mla_decode import default_num_splits, mla_decode
from mythos_rt.triton_kernels.split_kv import decode_workspace, pow2, tiles



def _inputs(B, H, R, P, S_max, lens, dtype=torch.float32, device="cpu"):
    ckv = torch.randn(B + 1, S_max, R, device=device).to(dtype)
    kpe = torch.randn(B + 1, S_max, P, device=device).to(dtype)
    kv_lens = torch.tensor(lens, dtype=torch.int32, device=device)
    for b, n in enumerate(lens):  # slots past the length hold garbage
        ckv[b, n:] = float("nan")
        kpe[b, n:] = float("nan")
    return (torch.randn(B, H, R, device=device).to(dtype),
            torch.randn(B, H, P, device=device).to(dtype), ckv, kpe, kv_lens)


@pytest.mark.parametrize("num_splits", [1, 2, 3, 5])
def test_awkward_sizes_any_split_count(num_splits):
    # S_max=40 (no multiple of a tile), H=3, R=24, rope=8, rows of 1, 17 and 40 keys.
    q_lat, q_pe, ckv, kpe, lens = _inputs(3, 3, 24, 8, 40, [1, 17, 40])
    ref = A.mla_decode(q_lat, q_pe, ckv, kpe, lens, 0.3)
    out = mla_decode(q_lat, q_pe, ckv, kpe, lens, 0.3, num_splits=num_splits)
    assert_rel_close(out, ref, TOL_FP32_INTERPRET)
    one = mla_decode(q_lat, q_pe, ckv, kpe, lens, 0.3, num_splits=1)
    assert_rel_close(out, one, TOL_FP32_INTERPRET, "vs num_splits=1")


@pytest.mark.parametrize("R,H", [(48, 3), (40, 5), (384, 24)])  # 32+16, 32+16, mythos_3b's 256+128
@pytest.mark.parametrize("num_splits", [1, 3])
def test_latent_read_as_two_tiles(R, H, num_splits):
    """A latent whose width is no power of two is read as two power-of-two tiles (the key's
    scores and the value's output both), not padded to the next power of two."""
    head, tail = tiles(R)
    assert tail and R <= head + tail < pow2(R)
    q_lat, q_pe, ckv, kpe, lens = _inputs(2, H, R, 8, 40, [40, 13])
    ref = A.mla_decode(q_lat, q_pe, ckv, kpe, lens, R ** -0.5)
    out = torch.full((2, H, R), float("nan"))
    mla_decode(q_lat, q_pe, ckv, kpe, lens, R ** -0.5, num_splits=num_splits, out=out)
    assert_rel_close(out, ref, TOL_FP32_INTERPRET)


def test_tiles():
    assert tiles(384) == (256, 128) and tiles(48) == (32, 16) and tiles(257) == (256, 16)
    assert tiles(512) == (512, 0) and tiles(24) == (32, 0) and tiles(100) == (128, 0)
    assert tiles(8) == (16, 0)  # tl.dot's smallest tile


def test_fp16_default_splits_and_buffers():
    B, H, R, P, S = 2, 4, 32, 16, 64
    q_lat, q_pe, ckv, kpe, lens = _inputs(B, H, R, P, S, [64, 23], torch.float16)
    ref = A.mla_decode(q_lat.float(), q_pe.float(), ckv.float(), kpe.float(), lens, 0.2)
    ns = default_num_splits(B, H, S, "cpu")
    out = torch.empty(B, H, R, dtype=torch.float16)
    ws = decode_workspace(B, H, R, 4, "cpu")
    got = mla_decode(q_lat, q_pe, ckv, kpe, lens, 0.2, num_splits=4, out=out, workspace=ws)
    assert got is out
    assert_rel_close(out, ref, TOL_FP16_INTERPRET)
    assert_rel_close(mla_decode(q_lat, q_pe, ckv, kpe, lens, 0.2), ref, TOL_FP16_INTERPRET,
                     f"default num_splits={ns}")


def test_strided_query_and_many_heads():
    """A (H, B, R) buffer viewed as (B, H, R), as the sublayer passes it; H > 64 needs
    several head blocks per row."""
    B, H, R, P, S = 2, 65, 16, 8, 24
    _, _, ckv, kpe, lens = _inputs(B, H, R, P, S, [24, 5])
    q_lat = torch.randn(H, B, R).transpose(0, 1)
    q_pe = torch.randn(B, H, P)
    ref = A.mla_decode(q_lat, q_pe, ckv, kpe, lens, 0.25)
    assert_rel_close(mla_decode(q_lat, q_pe, ckv, kpe, lens, 0.25, num_splits=2), ref,
                     TOL_FP32_INTERPRET)


@pytest.mark.gpu
@pytest.mark.parametrize("B,S", [(1, 1024), (8, 8192), (4, 32768)])
def test_bf16_gpu_long(B, S):
    H, R, P = 16, 256, 32  # mythos_1b
    lens = [S - 7 * b for b in range(B)]
    q_lat, q_pe, ckv, kpe, kv = _inputs(B, H, R, P, S, lens, torch.bfloat16, "cuda")
    ref = A.mla_decode(q_lat.float(), q_pe.float(), ckv.float(), kpe.float(), kv, 96 ** -0.5)
    for ns in (1, None):
        out = mla_decode(q_lat, q_pe, ckv, kpe, kv, 96 ** -0.5, num_splits=ns)
        assert_rel_close(out, ref, TOL_BF16_KERNEL, f"num_splits={ns}")


@pytest.mark.gpu
def test_cuda_graph_replay_follows_device_lengths():
    """Captured once with explicit num_splits/out/workspace; replays see kv_lens grow."""
    B, H, R, P, S = 4, 16, 256, 32, 4096
    q_lat, q_pe, ckv, kpe, lens = _inputs(B, H, R, P, S, [S] * B, torch.bfloat16, "cuda")
    ckv.normal_()
    kpe.normal_()
    lens.copy_(torch.tensor([10, 100, 1000, 3000], dtype=torch.int32))
    ns = default_num_splits(B, H, S, "cuda")
    out = torch.empty(B, H, R, device="cuda", dtype=torch.bfloat16)
    ws = decode_workspace(B, H, R, ns, "cuda")
    run = lambda: mla_decode(q_lat, q_pe, ckv, kpe, lens, 0.1, num_splits=ns, out=out,  # noqa
                             workspace=ws)
    run()  # compile outside the capture
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        run()
    for step in range(3):
        lens += 17 * step
        g.replay()
        ref = A.mla_decode(q_lat.float(), q_pe.float(), ckv.float(), kpe.float(), lens, 0.1)
        assert_rel_close(out, ref, TOL_BF16_KERNEL, f"replay {step}")

"""The dense_ffn op (Prelude/Coda SwiGLU FFN): torch and Triton (interpreted) backends vs
the reference Expert module, with and without the plan's intermediate buffers."""

import pytest
import torch

from mythos_rt import reference as R
from mythos_rt.ops import backends_of, select
from mythos_rt.config import MythosConfig
from mythos_rt.lower import op_args
from mythos_rt.ops.ffn import (HIDDEN_ALIGN, DenseFFN, align_hidden, dense_ffn_torch,
                               dense_ffn_triton)
from mythos_rt.testing import (TOL_BF16_KERNEL, TOL_FP16_INTERPRET, TOL_FP32_INTERPRET,
                               TOL_FP32_TORCH, assert_rel_close)


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


def _random_ffn(D: int, H: int, dtype=torch.float32) -> DenseFFN:
    return DenseFFN(w13=(torch.randn(2 * H, D) / D ** 0.5).to(dtype),
                    down=(torch.randn(D, H) / H ** 0.5).to(dtype))


@pytest.mark.parametrize("H", [90, 170, 64])  # 2730-like awkward sizes, and an aligned one
def test_triton_prepare_pads_the_hidden_size_exactly(H):
    """The Triton backend's prepared weights have a hidden size that is a multiple of 64,
    zero in the padding, which follows [gate; up] so that the model's weights are views of
    the padded ones; the torch and cpu backends keep the FFN as it is."""
    w = _random_ffn(40, H)
    prepared = select("dense_ffn", "cpu", "triton").prepare(w)
    Hp = -(-H // HIDDEN_ALIGN) * HIDDEN_ALIGN
    assert prepared.hidden == Hp and prepared.w13.shape == (2 * Hp, 40)
    assert prepared.down.shape == (40, Hp)
    assert prepared.width == (None if Hp == H else H)
    assert torch.equal(prepared.w13[:2 * H], w.w13) and not prepared.w13[2 * H:].any()
    assert torch.equal(prepared.down[:, :H], w.down) and not prepared.down[:, H:].any()
    model = prepared.unpadded()
    assert torch.equal(model.w13, w.w13) and torch.equal(model.down, w.down)
    assert model.w13.data_ptr() == prepared.w13.data_ptr()
    assert model.down.data_ptr() == prepared.down.data_ptr()
    assert select("dense_ffn", "cpu", "torch").prepare(w) is w
    assert select("dense_ffn", "cpu", "cpu").prepare(w).hidden == H


@pytest.mark.parametrize("dtype,tol", [(torch.float32, TOL_FP32_INTERPRET),
                                       (torch.float16, TOL_FP16_INTERPRET)])
@pytest.mark.parametrize("N,H", [(1, 90), (7, 170)])
def test_padded_triton_ffn_matches_unpadded_torch(dtype, tol, N, H):
    w = _random_ffn(48, H, dtype)
    prepared = align_hidden(w)
    x = torch.randn(N, 48).to(dtype)
    ref = dense_ffn_torch(x.float(), DenseFFN(w.w13.float(), w.down.float()))
    Hp = prepared.hidden
    out = torch.full((N, 48), float("nan"), dtype=dtype)
    gate_up = torch.full((N, 2 * Hp), float("nan"), dtype=dtype)
    act = torch.full((N, Hp), float("nan"), dtype=dtype)
    dense_ffn_triton(x, prepared, out=out, gate_up=gate_up, act=act)
    assert_rel_close(out, ref, tol)
    assert not act[:, H:].any()  # silu(0)·0 in every padded column
    assert_rel_close(dense_ffn_triton(x, prepared), ref, tol)  # its own intermediates
    padded32 = align_hidden(DenseFFN(w.w13.float(), w.down.float()))
    assert_rel_close(dense_ffn_torch(x.float(), padded32), ref, TOL_FP32_TORCH)


@pytest.mark.gpu
@pytest.mark.parametrize("N", [1, 7, 300])
def test_gpu_padded_ffn_bf16_at_mythos_1b_width(N):
    """mythos_1b's FFN (dim 2048, hidden 2730 padded to 2752) in bf16 on the GPU, with the
    plan's intermediate buffers, against the unpadded float32 FFN."""
    w = _random_ffn(2048, 2730)
    ref_x = torch.randn(N, 2048)
    prepared = align_hidden(DenseFFN(w.w13.cuda().bfloat16(), w.down.cuda().bfloat16()))
    x = ref_x.cuda().bfloat16()
    Hp = prepared.hidden
    gate_up = torch.full((N, 2 * Hp), float("nan"), device="cuda", dtype=torch.bfloat16)
    act = torch.full((N, Hp), float("nan"), device="cuda", dtype=torch.bfloat16)
    out = dense_ffn_triton(x, prepared, gate_up=gate_up, act=act)
    bf16_w = DenseFFN(w.w13.bfloat16().float(), w.down.bfloat16().float())
    assert_rel_close(out.float().cpu(), dense_ffn_torch(ref_x.bfloat16().float(), bf16_w),
                     TOL_BF16_KERNEL)

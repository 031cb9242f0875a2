"""Fused recurrent step of the looped block: prologue and epilogue kernels (Triton).

``loop_prologue_triton``  one pass per row: h + loop_embed(t) + e -> RMSNorm -> combined.
``loop_epilogue_triton``  one launch for all rows: depth-wise LoRA, LTI injection, ACT
    update, the on-device all-halted count and (optionally) the next loop's prologue.

Layout: one program owns BLOCK_M whole rows held in registers (BLOCK_D = next power of
two of D, masked), so block_out, h, e and h_out are each read once and h, h_out and the
next combined written once — the HBM minimum. The rank-r LoRA runs as r row-reductions
against rows of ``lora_down`` and r rank-1 updates with rows of ``lora_B``; those weights
(2·r·D elements) are re-read from L2 by every program and amortized over its BLOCK_M rows.
float32 accumulation whatever the storage dtype. The loop index is a plain int argument
(not specialized), so one compiled kernel serves every loop.

Both launchers have the signatures of their torch counterparts in
``mythos_rt.ops.recurrent`` and allocate nothing when given their output buffers.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import triton
import triton.language as tl

from mythos_rt.ops.recurrent import LOOP_THETA, ACTState, LoopParams, check_step_args

from ._rowwise import SUPPORTED_DTYPES, interpreter_rows, row_config


@triton.jit
def _loop_embed(cols, t_f, emb_c, loop_dim):
    """(BLOCK_D,) float32: sin(t·f_j) on [0, ld/2), cos(t·f_j) on [ld/2, ld), 0 after;
    f_j = exp(j·emb_c) with emb_c = -2·ln(theta)/loop_dim."""
    half = loop_dim // 2
    is_sin = cols < half
    j = tl.where(is_sin, cols, cols - half).to(tl.float32)
    ang = t_f * tl.exp(j * emb_c)
    emb = tl.where(is_sin, tl.sin(ang), tl.cos(ang))
    return tl.where(cols < loop_dim, emb, 0.0)


@triton.jit
def _norm_rows(s, w, D, eps):
    """s (BLOCK_M, BLOCK_D) float32 (zeros in padding) -> s * rsqrt(mean(s²) + eps) * w."""
    rstd = 1.0 / tl.sqrt(tl.sum(s * s, axis=1) / D + eps)
    return s * rstd[:, None] * w[None, :]


@triton.jit(do_not_specialize=["n_rows", "t"])
def _prologue_kernel(h_ptr, e_ptr, w_ptr, y_ptr, n_rows, D, t, emb_c, loop_dim, eps,
                     stride_h, stride_e, stride_y,
                     BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_D)
    cmask = cols < D
    mask = (rows < n_rows)[:, None] & cmask[None, :]
    r64 = rows.to(tl.int64)[:, None]
    h = tl.load(h_ptr + r64 * stride_h + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    e = tl.load(e_ptr + r64 * stride_e + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    emb = _loop_embed(cols, t.to(tl.float32), emb_c, loop_dim)
    s = h + emb[None, :] + e
    s = tl.where(mask, s, 0.0)
    w = tl.load(w_ptr + cols, mask=cmask, other=0.0).to(tl.float32)
    y = _norm_rows(s, w, D, eps)
    tl.store(y_ptr + r64 * stride_y + cols[None, :], y.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit(do_not_specialize=["n_rows", "t", "tc"])
def _epilogue_kernel(x_ptr, h_ptr, e_ptr, hout_ptr, cum_ptr, halted_ptr, nrun_ptr, nc_ptr,
                     normw_ptr, down_ptr, loraB_ptr, scale_ptr, A_ptr, injB_ptr,
                     haltw_ptr, haltb_ptr,
                     n_rows, D, t, tc, emb_c, loop_dim, thr, eps,
                     stride_x, stride_h, stride_e, stride_o, stride_nc,
                     R: tl.constexpr, HAS_NEXT: tl.constexpr, BLOCK_M: tl.constexpr,
                     BLOCK_D: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_D)
    rmask = rows < n_rows
    cmask = cols < D
    mask = rmask[:, None] & cmask[None, :]
    r64 = rows.to(tl.int64)[:, None]
    # every row-tensor load is issued up front (memory-level parallelism), then used
    x = tl.load(x_ptr + r64 * stride_x + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    h = tl.load(h_ptr + r64 * stride_h + cols[None, :], mask=mask, other=0.0)
    e = tl.load(e_ptr + r64 * stride_e + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    ho = tl.load(hout_ptr + r64 * stride_o + cols[None, :], mask=mask, other=0.0)

    # depth-wise LoRA: delta = sum_r (x·down_r · scale[tc, r]) · B_r
    delta = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    for r in range(R):  # a loop (not unrolled): r is up to 256 on the largest presets
        d_r = tl.load(down_ptr + r * D + cols, mask=cmask, other=0.0).to(tl.float32)
        s_r = tl.load(scale_ptr + tc * R + r).to(tl.float32)
        z = tl.sum(x * d_r[None, :], axis=1) * s_r
        b_r = tl.load(loraB_ptr + r * D + cols, mask=cmask, other=0.0).to(tl.float32)
        delta += z[:, None] * b_r[None, :]

    # LTI injection: h = A·h + B·e + (x + delta); the stored value is the new state
    a = tl.load(A_ptr + cols, mask=cmask, other=0.0).to(tl.float32)
    ib = tl.load(injB_ptr + cols, mask=cmask, other=0.0).to(tl.float32)
    hn = (a[None, :] * h.to(tl.float32) + ib[None, :] * e + (x + delta)).to(h.dtype)
    tl.store(h_ptr + r64 * stride_h + cols[None, :], hn, mask=mask)
    hs = tl.where(mask, hn.to(tl.float32), 0.0)

    # ACT: p = sigmoid(h·w + b); remainder rule; running mask; cumulative update
    hw = tl.load(haltw_ptr + cols, mask=cmask, other=0.0).to(tl.float32)
    hb = tl.load(haltb_ptr).to(tl.float32)
    logit = tl.sum(hs * hw[None, :], axis=1) + hb
    p = 1.0 / (1.0 + tl.exp(-logit))
    cum = tl.load(cum_ptr + rows, mask=rmask, other=0.0)
    was_halted = tl.load(halted_ptr + rows, mask=rmask, other=1) != 0  # padding: halted
    run = tl.where(was_halted, 0.0, 1.0)
    w = tl.where(cum + p >= thr, tl.maximum(1.0 - cum, 0.0), p) * run
    tl.store(hout_ptr + r64 * stride_o + cols[None, :],
             (ho.to(tl.float32) + w[:, None] * hs).to(ho.dtype), mask=mask)
    cum = cum + p * run
    tl.store(cum_ptr + rows, cum, mask=rmask)
    newly = (cum >= thr) & (run > 0.0)
    tl.store(halted_ptr + rows, (was_halted | newly).to(tl.uint8), mask=rmask)
    n_new = tl.sum(newly.to(tl.int32), axis=0)
    tl.atomic_add(nrun_ptr, -n_new, mask=n_new > 0)

    if HAS_NEXT:  # the next loop's prologue on the state just written
        emb = _loop_embed(cols, (t + 1).to(tl.float32), emb_c, loop_dim)
        s = tl.where(mask, hs + emb[None, :] + e, 0.0)
        nw = tl.load(normw_ptr + cols, mask=cmask, other=0.0).to(tl.float32)
        y = _norm_rows(s, nw, D, eps)
        tl.store(nc_ptr + r64 * stride_nc + cols[None, :], y.to(nc_ptr.dtype.element_ty),
                 mask=mask)


def _emb_c(loop_dim: int) -> float:
    return -2.0 * math.log(LOOP_THETA) / loop_dim


def epilogue_config(n_rows: int, dim: int) -> tuple[int, int, int]:
    """(BLOCK_D, BLOCK_M, num_warps) of the epilogue: ~8 fp32 per thread per row tile
    (it keeps several row vectors live: at ~16, BLOCK_D 4096 with the next prologue
    spilled 120 B on sm_90).

    Rows are packed (BLOCK_M up to 4) only when there are many of them, to amortize the
    L2 reads of the LoRA weights; decode-sized batches get one row per program.
    (Under the interpreter rows are packed by 16 for speed: ``interpreter_rows``.)
    """
    block_d = triton.next_power_of_2(max(dim, 16))
    block_m = 1 if n_rows < 1024 else max(1, min(4, 8192 // block_d))
    num_warps = max(4, min(16, block_m * block_d // 256))
    block_m = interpreter_rows(block_m, n_rows)
    return block_d, block_m, num_warps


def _check_dtype(t: torch.Tensor):
    if t.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"dtype {t.dtype} not supported (fp32/fp16/bf16)")


def loop_prologue_triton(h: torch.Tensor, e: torch.Tensor, params: LoopParams, t: int,
                         out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Triton ``loop_prologue``; see ``mythos_rt.ops.recurrent.loop_prologue_torch``."""
    check_step_args(h, e, params, out=out)
    _check_dtype(h)
    if out is None:
        out = torch.empty_like(h)
    N, D = h.shape
    if N:
        block_d, block_m, num_warps = row_config(D, N)
        _prologue_kernel[(triton.cdiv(N, block_m),)](
            h, e, params.norm_w, out, N, D, int(t), _emb_c(params.loop_dim), params.loop_dim,
            float(params.eps), h.stride(0), e.stride(0), out.stride(0),
            BLOCK_M=block_m, BLOCK_D=block_d, num_warps=num_warps)
    return out


def loop_epilogue_triton(block_out: torch.Tensor, h: torch.Tensor, e: torch.Tensor,
                         params: LoopParams, t: int, state: ACTState,
                         next_combined: Optional[torch.Tensor] = None,
                         *, _config: Optional[tuple[int, int, int]] = None) -> None:
    """Triton ``loop_epilogue`` (one launch); see ``mythos_rt.ops.recurrent.loop_epilogue_torch``.

    ``_config`` = (BLOCK_D, BLOCK_M, num_warps) overrides the heuristic (tests, tuning).
    """
    check_step_args(h, e, params, block_out=block_out, state=state, out=next_combined)
    _check_dtype(h)
    if state.h_out.dtype != h.dtype:
        raise TypeError(f"ACTState.h_out dtype {state.h_out.dtype} != h dtype {h.dtype}")
    if state.h_out.stride(1) != 1:
        raise ValueError("ACTState.h_out needs a contiguous last dim")
    N, D = h.shape
    if N == 0:
        return None
    block_d, block_m, num_warps = _config or epilogue_config(N, D)
    has_next = next_combined is not None
    nc = next_combined if has_next else h  # unused when HAS_NEXT is False
    _epilogue_kernel[(triton.cdiv(N, block_m),)](
        block_out, h, e, state.h_out, state.cum_p, state.halted.view(torch.uint8),
        state.n_running, nc,
        params.norm_w, params.lora_down, params.lora_B, params.lora_scale, params.A,
        params.inj_B, params.halt_w, params.halt_b,
        N, D, int(t), min(int(t), params.max_loops - 1),
        _emb_c(params.loop_dim), params.loop_dim, float(params.threshold), float(params.eps),
        block_out.stride(0), h.stride(0), e.stride(0), state.h_out.stride(0), nc.stride(0),
        R=params.rank, HAS_NEXT=has_next, BLOCK_M=block_m, BLOCK_D=block_d, num_warps=num_warps)
    return None

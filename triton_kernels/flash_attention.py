"""Causal flash attention with per-row offsets (prefill and chunked prefill), GQA-aware.

One program handles BLOCK_M queries of one (row, head): online softmax in base 2 over
key tiles; query i of row b sits at position ``q_start[b] + i`` and sees keys
``j < kv_len[b]`` (and ``j <= q_start[b] + i`` when causal). Tiles every query of the
block sees in full run without masks; only the diagonal / tail tiles are masked.

The query/key feature dim may come in two parts (``Q1·K1 + Q2·K2``): a non-power-of-two
head dim (96 = 64 + 32, 192 = 128 + 64) is split so no tile is padded, and MLA prefill
passes [k_nope | shared rope key] without concatenating them (the rope key has head
stride 0).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .split_kv import LOG2E, input_precision, pow2, split_dim


@triton.jit
def _flash_kernel(
    Q1, Q2, K1, K2, V, O, QSTART, KVLEN,
    T, H, G, D1, D2, DV, qk_scale,
    sq1_b, sq1_t, sq1_h, sq2_b, sq2_t, sq2_h,
    sk1_b, sk1_s, sk1_h, sk2_b, sk2_s, sk2_h, sv_b, sv_s, sv_h,
    so_b, so_t, so_h,
    CAUSAL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_D1: tl.constexpr, BLOCK_D2: tl.constexpr, BLOCK_DV: tl.constexpr,
    HAS_K2: tl.constexpr, IP: tl.constexpr,
):
    mblk = tl.program_id(0)
    b = (tl.program_id(1) // H).to(tl.int64)
    h = (tl.program_id(1) % H).to(tl.int64)
    kvh = h // G

    q_start = tl.load(QSTART + b)
    kv_len = tl.load(KVLEN + b)
    t = mblk * BLOCK_M + tl.arange(0, BLOCK_M)
    tmask = t < T
    qpos = q_start + t
    t64 = t.to(tl.int64)

    d1 = tl.arange(0, BLOCK_D1)
    q1 = tl.load(Q1 + b * sq1_b + h * sq1_h + t64[:, None] * sq1_t + d1[None, :],
                 mask=tmask[:, None] & (d1[None, :] < D1), other=0.0)
    if HAS_K2:
        d2 = tl.arange(0, BLOCK_D2)
        q2 = tl.load(Q2 + b * sq2_b + h * sq2_h + t64[:, None] * sq2_t + d2[None, :],
                     mask=tmask[:, None] & (d2[None, :] < D2), other=0.0)
    dv = tl.arange(0, BLOCK_DV)
    k1_base = K1 + b * sk1_b + kvh * sk1_h
    k2_base = K2 + b * sk2_b + kvh * sk2_h
    v_base = V + b * sv_b + kvh * sv_h

    first_pos = q_start + mblk * BLOCK_M
    if CAUSAL:
        hi = tl.minimum(kv_len, first_pos + BLOCK_M)
        full_end = tl.minimum(kv_len, first_pos + 1)
    else:
        hi = kv_len
        full_end = kv_len
    full_end = (tl.maximum(full_end, 0) // BLOCK_N) * BLOCK_N

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], tl.float32)
    # Phase 0: tiles every query of the block sees whole (no masks); phase 1: the rest.
    for phase in tl.static_range(2):
        if phase == 0:
            lo_n = 0
            hi_n = full_end
        else:
            lo_n = full_end
            hi_n = hi
        for n0 in range(lo_n, hi_n, BLOCK_N):
            n = n0 + tl.arange(0, BLOCK_N)
            n64 = n.to(tl.int64)
            if phase == 0:
                k1 = tl.load(k1_base + n64[:, None] * sk1_s + d1[None, :],
                             mask=d1[None, :] < D1, other=0.0)
            else:
                k1 = tl.load(k1_base + n64[:, None] * sk1_s + d1[None, :],
                             mask=(n[:, None] < hi) & (d1[None, :] < D1), other=0.0)
            s = tl.dot(q1, tl.trans(k1), input_precision=IP)
            if HAS_K2:
                if phase == 0:
                    k2 = tl.load(k2_base + n64[:, None] * sk2_s + d2[None, :],
                                 mask=d2[None, :] < D2, other=0.0)
                else:
                    k2 = tl.load(k2_base + n64[:, None] * sk2_s + d2[None, :],
                                 mask=(n[:, None] < hi) & (d2[None, :] < D2), other=0.0)
                s += tl.dot(q2, tl.trans(k2), input_precision=IP)
            s = s * qk_scale
            if phase == 1:
                keep = n[None, :] < kv_len
                if CAUSAL:
                    keep = keep & (n[None, :] <= qpos[:, None])
                s = tl.where(keep, s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            # A query with no visible key yet keeps m = -inf; shift by 0 to avoid NaN.
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            alpha = tl.exp2(m_i - m_safe)
            p = tl.exp2(s - m_safe[:, None])
            l_i = l_i * alpha + tl.sum(p, 1)
            if phase == 0:
                v = tl.load(v_base + n64[:, None] * sv_s + dv[None, :],
                            mask=dv[None, :] < DV, other=0.0)
            else:
                v = tl.load(v_base + n64[:, None] * sv_s + dv[None, :],
                            mask=(n[:, None] < hi) & (dv[None, :] < DV), other=0.0)
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=IP)
            m_i = m_new

    o = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
    tl.store(O + b * so_b + h * so_h + t64[:, None] * so_t + dv[None, :],
             o.to(O.dtype.element_ty), mask=tmask[:, None] & (dv[None, :] < DV))


def _launch(q1, q2, k1, k2, v, out, q_start, kv_len, scale, causal):
    """q1/q2 (B, T, H, D1/D2), k1/k2 (B, S, Hk, D1/D2), v (B, S, Hk, DV) strided views
    with a contiguous last dim (Hk-stride 0 allowed); out (B, T, H, DV)."""
    B, T, H, D1 = q1.shape
    Hk, DV = k1.shape[2], v.shape[-1]
    has_k2 = q2 is not None
    for x in (q1, k1, v, out) + ((q2, k2) if has_k2 else ()):
        assert x.stride(-1) == 1, "the last dim must be contiguous"
    D2 = q2.shape[-1] if has_k2 else 0
    q2a, k2a = (q2, k2) if has_k2 else (q1, k1)
    BLOCK_D1, BLOCK_D2, BLOCK_DV = pow2(D1), pow2(D2), pow2(DV)
    BLOCK_M, BLOCK_N, num_warps = tile_config(D1, D2, DV, T)
    grid = (triton.cdiv(T, BLOCK_M), B * H)
    _flash_kernel[grid](
        q1, q2a, k1, k2a, v, out, q_start, kv_len,
        T, H, H // Hk, D1, D2, DV, scale * LOG2E,
        q1.stride(0), q1.stride(1), q1.stride(2), q2a.stride(0), q2a.stride(1), q2a.stride(2),
        k1.stride(0), k1.stride(1), k1.stride(2), k2a.stride(0), k2a.stride(1), k2a.stride(2),
        v.stride(0), v.stride(1), v.stride(2), out.stride(0), out.stride(1), out.stride(2),
        CAUSAL=bool(causal), BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_D1=BLOCK_D1,
        BLOCK_D2=BLOCK_D2, BLOCK_DV=BLOCK_DV, HAS_K2=has_k2, IP=input_precision(q1.dtype),
        num_warps=num_warps, num_stages=2)
    return out


def tile_config(d1: int, d2: int, dv: int, T: int) -> tuple[int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps) for key parts of widths d1 and d2 (0: no second
    part) and value width dv: 128×64 tiles on 8 warps up to 128 wide, 64×32 on 4 above.

    The width is the parts' padded sum; a missing second part counts 0, not its
    placeholder block (pow2(0) = 16), which would mark d = 128 as wide.
    """
    width = pow2(d1) + (pow2(d2) if d2 else 0)
    wide = width > 128 or pow2(dv) > 128
    block_m = min(64 if wide else 128, pow2(T))
    return block_m, 32 if wide else 64, 4 if block_m <= 64 else 8


def flash_attention(q, k, v, q_start, kv_len, scale, causal=True, out=None):
    """Triton flash attention (same contract as ``mythos_rt.ops.attention.flash_attention``).

    q (B, T, H, dqk), k (B, S, Hk, dqk), v (B, S, Hk, dv), q_start/kv_len (B,) int32 device
    tensors; H % Hk == 0. Returns (B, T, H, dv) in q's dtype (fp32 accumulation).
    """
    B, T, H, dqk = q.shape
    if out is None:
        out = torch.empty(B, T, H, v.shape[-1], device=q.device, dtype=q.dtype)
    c = split_dim(dqk)
    if c == dqk:
        return _launch(q, None, k, None, v, out, q_start, kv_len, scale, causal)
    return _launch(q[..., :c], q[..., c:], k[..., :c], k[..., c:], v, out, q_start, kv_len,
                   scale, causal)

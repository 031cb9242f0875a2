"""Causal flash attention with per-row offsets (prefill and chunked prefill), GQA-aware.

One program handles BLOCK_M query rows of one (row, KV head, key split). The rows are
the (token, head) pairs of the G = H/Hk query heads that share the KV head, token-major,
so each key/value tile is loaded once for all of them (MLA's latent prefill has one
shared KV "head": every query head rides in M). Online softmax in base 2 over key
tiles; query token i of row b sits at position ``q_start[b] + i`` and sees keys
``j < kv_len[b]`` (and ``j <= q_start[b] + i`` when causal). Tiles every row of the
block sees in full run without masks; only the diagonal / tail tiles are masked.

The query/key feature dim may come in two parts (``Q1·K1 + Q2·K2``): a non-power-of-two
head dim (96 = 64 + 32, 192 = 128 + 64) is split so no tile is padded, MLA's expanded
prefill passes [k_nope | shared rope key] without concatenating them (the rope key has
head stride 0), and MLA's latent prefill passes [latent | rope key] with V aliasing the
latent (loaded once, as in decode).

Short chunks give few (row, head, query block) programs, so the key range is also cut
into ``num_splits`` pieces (default: enough programs for ~2 waves of SMs, no piece under
256 keys); each piece writes a normalized partial and its base-2 log-sum-exp, merged by
``split_kv.combine_splits``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .split_kv import (LOG2E, choose_num_splits, combine_splits, input_precision, pow2,
                       split_dim)


@triton.jit
def _flash_kernel(
    Q1, Q2, K1, K2, V, O, LSE, QSTART, KVLEN,
    T, HK, G, D1, D2, DV, NUM_SPLITS, qk_scale,
    sq1_b, sq1_t, sq1_h, sq2_b, sq2_t, sq2_h,
    sk1_b, sk1_s, sk1_h, sk2_b, sk2_s, sk2_h, sv_b, sv_s, sv_h,
    so_b, so_t, so_h, so_s, sl_b, sl_t, sl_h, sl_s,
    CAUSAL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_D1: tl.constexpr, BLOCK_D2: tl.constexpr, BLOCK_DV: tl.constexpr,
    HAS_K2: tl.constexpr, V_IS_K1: tl.constexpr, WRITE_LSE: tl.constexpr, IP: tl.constexpr,
):
    mblk = tl.program_id(0)
    b = (tl.program_id(1) // HK).to(tl.int64)
    kvh = (tl.program_id(1) % HK).to(tl.int64)
    split = tl.program_id(2)

    q_start = tl.load(QSTART + b)
    kv_len = tl.load(KVLEN + b)
    r = mblk * BLOCK_M + tl.arange(0, BLOCK_M)   # row = token * G + head within the group
    rmask = r < T * G
    t = r // G
    qpos = q_start + t
    t64 = t.to(tl.int64)
    h64 = kvh * G + (r % G).to(tl.int64)

    d1 = tl.arange(0, BLOCK_D1)
    q1 = tl.load(Q1 + (b * sq1_b + t64 * sq1_t + h64 * sq1_h)[:, None] + d1[None, :],
                 mask=rmask[:, None] & (d1[None, :] < D1), other=0.0)
    if HAS_K2:
        d2 = tl.arange(0, BLOCK_D2)
        q2 = tl.load(Q2 + (b * sq2_b + t64 * sq2_t + h64 * sq2_h)[:, None] + d2[None, :],
                     mask=rmask[:, None] & (d2[None, :] < D2), other=0.0)
    dv = tl.arange(0, BLOCK_DV)
    k1_base = K1 + b * sk1_b + kvh * sk1_h
    k2_base = K2 + b * sk2_b + kvh * sk2_h
    v_base = V + b * sv_b + kvh * sv_h

    if CAUSAL:
        first_tok = (mblk * BLOCK_M) // G
        last_tok = tl.minimum((mblk * BLOCK_M + BLOCK_M - 1) // G, T - 1)
        hi = tl.minimum(kv_len, q_start + last_tok + 1)
        full_end = tl.minimum(kv_len, q_start + first_tok + 1)
    else:
        hi = kv_len
        full_end = kv_len
    full_end = (tl.maximum(full_end, 0) // BLOCK_N) * BLOCK_N
    # This program's piece of [0, hi): whole tiles, so no tile straddles two pieces.
    piece = tl.cdiv(tl.cdiv(hi, NUM_SPLITS), BLOCK_N) * BLOCK_N
    start = split * piece
    end = tl.minimum(start + piece, hi)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], tl.float32)
    # Phase 0: tiles every row of the block sees whole (no masks); phase 1: the rest.
    for phase in tl.static_range(2):
        if phase == 0:
            lo_n = start
            hi_n = tl.minimum(full_end, end)
        else:
            lo_n = tl.maximum(full_end, start)
            hi_n = end
        for n0 in range(lo_n, hi_n, BLOCK_N):
            n = n0 + tl.arange(0, BLOCK_N)
            n64 = n.to(tl.int64)
            if phase == 0:
                k1 = tl.load(k1_base + n64[:, None] * sk1_s + d1[None, :],
                             mask=d1[None, :] < D1, other=0.0)
            else:
                k1 = tl.load(k1_base + n64[:, None] * sk1_s + d1[None, :],
                             mask=(n[:, None] < end) & (d1[None, :] < D1), other=0.0)
            s = tl.dot(q1, tl.trans(k1), input_precision=IP)
            if HAS_K2:
                if phase == 0:
                    k2 = tl.load(k2_base + n64[:, None] * sk2_s + d2[None, :],
                                 mask=d2[None, :] < D2, other=0.0)
                else:
                    k2 = tl.load(k2_base + n64[:, None] * sk2_s + d2[None, :],
                                 mask=(n[:, None] < end) & (d2[None, :] < D2), other=0.0)
                s += tl.dot(q2, tl.trans(k2), input_precision=IP)
            s = s * qk_scale
            if phase == 1:
                keep = n[None, :] < end
                if CAUSAL:
                    keep = keep & (n[None, :] <= qpos[:, None])
                s = tl.where(keep, s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            # A row with no visible key yet keeps m = -inf; shift by 0 to avoid NaN.
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            alpha = tl.exp2(m_i - m_safe)
            p = tl.exp2(s - m_safe[:, None])
            l_i = l_i * alpha + tl.sum(p, 1)
            if V_IS_K1:
                v = k1
            elif phase == 0:
                v = tl.load(v_base + n64[:, None] * sv_s + dv[None, :],
                            mask=dv[None, :] < DV, other=0.0)
            else:
                v = tl.load(v_base + n64[:, None] * sv_s + dv[None, :],
                            mask=(n[:, None] < end) & (dv[None, :] < DV), other=0.0)
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=IP)
            m_i = m_new

    has = l_i > 0
    o = acc / tl.where(has, l_i, 1.0)[:, None]
    row_o = b * so_b + t64 * so_t + h64 * so_h + split * so_s
    tl.store(O + row_o[:, None] + dv[None, :], o.to(O.dtype.element_ty),
             mask=rmask[:, None] & (dv[None, :] < DV))
    if WRITE_LSE:
        lse = tl.where(has, m_i + tl.log2(tl.where(has, l_i, 1.0)), float("-inf"))
        tl.store(LSE + b * sl_b + t64 * sl_t + h64 * sl_h + split * sl_s, lse, mask=rmask)


def _launch(q1, q2, k1, k2, v, out, q_start, kv_len, scale, causal, num_splits=None):
    """q1/q2 (B, T, H, D1/D2), k1/k2 (B, S, Hk, D1/D2), v (B, S, Hk, DV) strided views
    with a contiguous last dim (Hk-stride 0 allowed; ``v is k1`` means V aliases K1);
    out (B, T, H, DV). ``num_splits`` None: from the shapes and the SM count."""
    B, T, H, D1 = q1.shape
    S, Hk, DV = k1.shape[1], k1.shape[2], v.shape[-1]
    G = H // Hk
    has_k2 = q2 is not None
    v_is_k1 = v is k1
    for x in (q1, k1, v, out) + ((q2, k2) if has_k2 else ()):
        assert x.stride(-1) == 1, "the last dim must be contiguous"
    D2 = q2.shape[-1] if has_k2 else 0
    q2a, k2a = (q2, k2) if has_k2 else (q1, k1)
    BLOCK_D1, BLOCK_D2, BLOCK_DV = pow2(D1), pow2(D2), pow2(DV)
    BLOCK_M, BLOCK_N, num_warps = tile_config(D1, D2, DV, T * G)
    n_mblk = triton.cdiv(T * G, BLOCK_M)
    if num_splits is None:
        num_splits = choose_num_splits(B, Hk * n_mblk, S, q1.device)
    num_splits = int(num_splits)
    if num_splits == 1:
        o_part, lse = out.unsqueeze(3), None
    else:
        o_part = torch.empty(B, T, H, num_splits, DV, device=q1.device, dtype=torch.float32)
        lse = torch.empty(B, T, H, num_splits, device=q1.device, dtype=torch.float32)
    lse_arg = lse if lse is not None else o_part
    sl = lse.stride() if lse is not None else (0, 0, 0, 0)
    grid = (n_mblk, B * Hk, num_splits)
    _flash_kernel[grid](
        q1, q2a, k1, k2a, v, o_part, lse_arg, q_start, kv_len,
        T, Hk, G, D1, D2, DV, num_splits, scale * LOG2E,
        q1.stride(0), q1.stride(1), q1.stride(2), q2a.stride(0), q2a.stride(1), q2a.stride(2),
        k1.stride(0), k1.stride(1), k1.stride(2), k2a.stride(0), k2a.stride(1), k2a.stride(2),
        v.stride(0), v.stride(1), v.stride(2),
        o_part.stride(0), o_part.stride(1), o_part.stride(2), o_part.stride(3), *sl,
        CAUSAL=bool(causal), BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_D1=BLOCK_D1,
        BLOCK_D2=BLOCK_D2, BLOCK_DV=BLOCK_DV, HAS_K2=has_k2, V_IS_K1=v_is_k1,
        WRITE_LSE=num_splits > 1, IP=input_precision(q1.dtype), num_warps=num_warps,
        num_stages=2)
    if num_splits > 1:
        # (B, T) flatten into one row axis: o_part/lse are ours (contiguous); out may not be.
        flat = out.stride(0) == T * out.stride(1) or B == 1
        target = out if flat else torch.empty_like(out, memory_format=torch.contiguous_format)
        combine_splits(o_part.view(B * T, H, num_splits, DV), lse.view(B * T, H, num_splits),
                       target.view(B * T, H, DV))
        if not flat:
            out.copy_(target)
    return out


def tile_config(d1: int, d2: int, dv: int, rows: int) -> tuple[int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps) for key parts of widths d1 and d2 (0: no second
    part), value width dv and ``rows`` query rows (tokens × heads per KV head): 128×64
    tiles on 8 warps up to 128 wide, 64×32 on 4 above, and at most 16384 accumulator
    elements per program, on 8 warps (MLA's 256 / 512-wide latent: 64 / 32 rows; on 4
    warps the 512-wide one spills on sm_90).

    The width is the parts' padded sum; a missing second part counts 0, not its
    placeholder block (pow2(0) = 16), which would mark d = 128 as wide.
    """
    width = pow2(d1) + (pow2(d2) if d2 else 0)
    wide = width > 128 or pow2(dv) > 128
    block_m = min(64 if wide else 128, 16384 // pow2(dv), pow2(rows))
    big = block_m > 64 or block_m * pow2(dv) >= 16384
    return block_m, 32 if wide else 64, 8 if big else 4


def flash_attention(q, k, v, q_start, kv_len, scale, causal=True, out=None, num_splits=None):
    """Triton flash attention (same contract as ``mythos_rt.ops.attention.flash_attention``).

    q (B, T, H, dqk), k (B, S, Hk, dqk), v (B, S, Hk, dv), q_start/kv_len (B,) int32 device
    tensors; H % Hk == 0. ``num_splits``: pieces of the key range (None: enough programs
    to fill the GPU). Returns (B, T, H, dv) in q's dtype (fp32 accumulation).
    """
    B, T, H, dqk = q.shape
    if out is None:
        out = torch.empty(B, T, H, v.shape[-1], device=q.device, dtype=q.dtype)
    c = split_dim(dqk)
    if c == dqk:
        return _launch(q, None, k, None, v, out, q_start, kv_len, scale, causal, num_splits)
    return _launch(q[..., :c], q[..., c:], k[..., :c], k[..., c:], v, out, q_start, kv_len,
                   scale, causal, num_splits)

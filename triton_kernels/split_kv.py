"""Split-KV (flash-decoding) attention for one new token per row, shared by MLA and GQA.

One program handles (row b, a block of query heads that share one KV head, split s). The
key range [0, kv_len[b]) is cut into ``num_splits`` contiguous chunks *inside the kernel*
(kv_len is read from the device), so the launch depends only on host-side upper bounds
and is CUDA-graph capturable. Each split writes its normalized partial output and its
base-2 log-sum-exp; a combine kernel merges the splits. With one split the partial
output is written straight into the result and no combine runs.

The key may come in two parts (``K1 | K2``, e.g. MLA's latent | rope key) and the value
may alias the first key part (MLA: V is the latent itself, loaded once). A first part whose
width is no power of two is read as two power-of-two column tiles (``tiles``: mythos_3b's
latent of 384 as 256 + 128, not one tile of 512), and so is V when it aliases it: the
padding costs registers (the accumulator is BLOCK_H × the V tile) and shared memory.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

LOG2E = 1.4426950408889634


def pow2(n: int, lo: int = 16) -> int:
    """Next power of two >= max(n, lo) (tl.dot needs every dim >= 16 on GPU)."""
    return max(lo, triton.next_power_of_2(max(1, n)))


def split_dim(d: int) -> int:
    """Where to cut a head dim into power-of-two parts: d itself when d is a power of
    two or <= 16, else the largest power of two below it."""
    if d <= 16 or d & (d - 1) == 0:
        return d
    return 1 << (d.bit_length() - 1)


def tiles(d: int) -> tuple[int, int]:
    """Column tiles covering ``d``: (head, tail) cut at ``split_dim`` where the two are
    narrower than one padded tile (384: 256 + 128, not 512), else (pow2(d), 0)."""
    head = split_dim(d)
    tail = pow2(d - head) if head < d else 0
    return (head, tail) if tail and head + tail < pow2(d) else (pow2(d), 0)


def input_precision(dtype: torch.dtype) -> str:
    """Full fp32 products for fp32 inputs (no TF32); the default elsewhere."""
    return "ieee" if dtype == torch.float32 else "tf32"


H100_SMS = 132


def sm_count(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    # meta: the static sm_90 checks (sm90_check) stand in for an H100
    return H100_SMS if device.type == "meta" else 4


def choose_num_splits(batch: int, head_programs: int, max_len: int, device,
                      min_per_split: int = 256, max_splits: int = 64) -> int:
    """Splits per row from host-side upper bounds only: fill ~2 waves of SMs, no split
    shorter than ``min_per_split`` keys at ``max_len`` (the cache capacity)."""
    sms = sm_count(torch.device(device))
    by_len = max(1, math.ceil(max_len / min_per_split))
    by_sms = max(1, math.ceil(2 * sms / max(1, batch * head_programs)))
    return int(max(1, min(max_splits, by_len, by_sms)))


def decode_workspace(batch: int, heads: int, dv: int, num_splits: int, device):
    """Preallocated float32 (partial outputs (B, H, splits, dv), lse (B, H, splits))."""
    return (torch.empty(batch, heads, num_splits, dv, device=device, dtype=torch.float32),
            torch.empty(batch, heads, num_splits, device=device, dtype=torch.float32))


@triton.jit
def _split_kv_kernel(
    Q1, Q2, K1, K2, V, LENS, O, LSE,
    G, N_HBLK, D1, D2, DV, NUM_SPLITS, qk_scale,
    sq1_b, sq1_h, sq2_b, sq2_h,
    sk1_b, sk1_s, sk1_h, sk2_b, sk2_s, sk2_h, sv_b, sv_s, sv_h,
    so_b, so_h, so_s, sl_b, sl_h, sl_s,
    BLOCK_H: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D1: tl.constexpr,
    BLOCK_D2: tl.constexpr, BLOCK_DV: tl.constexpr, BLOCK_D1_TAIL: tl.constexpr,
    HAS_K2: tl.constexpr, V_IS_K1: tl.constexpr, WRITE_LSE: tl.constexpr, IP: tl.constexpr,
):
    # BLOCK_D1_TAIL > 0: K1's columns are two tiles, [0, BLOCK_D1) and BLOCK_D1 + [0, TAIL),
    # and so are V's (V_IS_K1; then BLOCK_DV == BLOCK_D1), with one accumulator each.
    b = tl.program_id(0).to(tl.int64)
    kvh = tl.program_id(1) // N_HBLK
    hblk = tl.program_id(1) % N_HBLK
    split = tl.program_id(2)

    kv_len = tl.load(LENS + b)
    chunk = tl.cdiv(tl.cdiv(kv_len, NUM_SPLITS), BLOCK_N) * BLOCK_N
    start = split * chunk
    end = tl.minimum(start + chunk, kv_len)

    local = hblk * BLOCK_H + tl.arange(0, BLOCK_H)
    hmask = local < G
    heads = (kvh * G + local).to(tl.int64)
    d1 = tl.arange(0, BLOCK_D1)
    q1 = tl.load(Q1 + b * sq1_b + heads[:, None] * sq1_h + d1[None, :],
                 mask=hmask[:, None] & (d1[None, :] < D1), other=0.0)
    if BLOCK_D1_TAIL > 0:
        d1t = BLOCK_D1 + tl.arange(0, BLOCK_D1_TAIL)
        q1t = tl.load(Q1 + b * sq1_b + heads[:, None] * sq1_h + d1t[None, :],
                      mask=hmask[:, None] & (d1t[None, :] < D1), other=0.0)
    if HAS_K2:
        d2 = tl.arange(0, BLOCK_D2)
        q2 = tl.load(Q2 + b * sq2_b + heads[:, None] * sq2_h + d2[None, :],
                     mask=hmask[:, None] & (d2[None, :] < D2), other=0.0)
    dv = tl.arange(0, BLOCK_DV)

    k1_base = K1 + b * sk1_b + kvh.to(tl.int64) * sk1_h
    k2_base = K2 + b * sk2_b + kvh.to(tl.int64) * sk2_h
    v_base = V + b * sv_b + kvh.to(tl.int64) * sv_h

    m_i = tl.full([BLOCK_H], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_H], tl.float32)
    acc = tl.zeros([BLOCK_H, BLOCK_DV], tl.float32)
    if BLOCK_D1_TAIL > 0 and V_IS_K1:
        acc_t = tl.zeros([BLOCK_H, BLOCK_D1_TAIL], tl.float32)
    for n0 in range(start, end, BLOCK_N):
        n = n0 + tl.arange(0, BLOCK_N)
        nmask = n < end
        n64 = n.to(tl.int64)
        k1 = tl.load(k1_base + n64[:, None] * sk1_s + d1[None, :],
                     mask=nmask[:, None] & (d1[None, :] < D1), other=0.0)
        s = tl.dot(q1, tl.trans(k1), input_precision=IP)
        if BLOCK_D1_TAIL > 0:
            k1t = tl.load(k1_base + n64[:, None] * sk1_s + d1t[None, :],
                          mask=nmask[:, None] & (d1t[None, :] < D1), other=0.0)
            s += tl.dot(q1t, tl.trans(k1t), input_precision=IP)
        if HAS_K2:
            k2 = tl.load(k2_base + n64[:, None] * sk2_s + d2[None, :],
                         mask=nmask[:, None] & (d2[None, :] < D2), other=0.0)
            s += tl.dot(q2, tl.trans(k2), input_precision=IP)
        s = tl.where(nmask[None, :], s * qk_scale, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        if V_IS_K1:
            v = k1
        else:
            v = tl.load(v_base + n64[:, None] * sv_s + dv[None, :],
                        mask=nmask[:, None] & (dv[None, :] < DV), other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=IP)
        if BLOCK_D1_TAIL > 0 and V_IS_K1:
            acc_t = acc_t * alpha[:, None] + tl.dot(p.to(k1t.dtype), k1t, input_precision=IP)
        m_i = m_new

    has = l_i > 0
    l_safe = tl.where(has, l_i, 1.0)
    lse = tl.where(has, m_i + tl.log2(l_safe), float("-inf"))
    o_row = O + b * so_b + heads[:, None] * so_h + split * so_s
    tl.store(o_row + dv[None, :], (acc / l_safe[:, None]).to(O.dtype.element_ty),
             mask=hmask[:, None] & (dv[None, :] < DV))
    if BLOCK_D1_TAIL > 0 and V_IS_K1:
        tl.store(o_row + d1t[None, :], (acc_t / l_safe[:, None]).to(O.dtype.element_ty),
                 mask=hmask[:, None] & (d1t[None, :] < DV))
    if WRITE_LSE:
        tl.store(LSE + b * sl_b + heads * sl_h + split * sl_s, lse, mask=hmask)


@triton.jit
def _combine_kernel(O_PART, LSE, OUT, DV, NUM_SPLITS,
                    sp_b, sp_h, sp_s, sl_b, sl_h, sl_s, so_b, so_h,
                    BLOCK_S: tl.constexpr, BLOCK_DV: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1).to(tl.int64)
    d = tl.program_id(2) * BLOCK_DV + tl.arange(0, BLOCK_DV)
    s = tl.arange(0, BLOCK_S)
    smask = s < NUM_SPLITS
    lse = tl.load(LSE + b * sl_b + h * sl_h + s * sl_s, mask=smask, other=float("-inf"))
    m = tl.max(lse, 0)
    m = tl.where(m == float("-inf"), 0.0, m)
    w = tl.exp2(lse - m)
    denom = tl.sum(w, 0)
    part = tl.load(O_PART + b * sp_b + h * sp_h + s[:, None] * sp_s + d[None, :],
                   mask=smask[:, None] & (d[None, :] < DV), other=0.0)
    o = tl.sum(part * w[:, None], 0) / tl.where(denom > 0, denom, 1.0)
    tl.store(OUT + b * so_b + h * so_h + d, o.to(OUT.dtype.element_ty), mask=d < DV)


def combine_splits(o_part, lse, out):
    """Merge key-range splits: o_part (N, H, splits, DV) normalized float32 partials and
    lse (N, H, splits) their base-2 log-sum-exps (-inf: an empty split) into out (N, H, DV)
    (last dims contiguous). Shared by split-KV decode and split flash attention."""
    N, H, num_splits, DV = o_part.shape
    bdv = min(128, pow2(DV, 1))
    _combine_kernel[(N, H, triton.cdiv(DV, bdv))](
        o_part, lse, out, DV, num_splits,
        o_part.stride(0), o_part.stride(1), o_part.stride(2),
        lse.stride(0), lse.stride(1), lse.stride(2), out.stride(0), out.stride(1),
        BLOCK_S=pow2(num_splits, 1), BLOCK_DV=bdv)


def split_kv_decode(q1, q2, k1, k2, v, kv_lens, scale, out, num_splits, workspace=None):
    """Launch split-KV decode.

    q1 (B, H, D1), q2 (B, H, D2) or None; k1/k2/v: (B_max, S_max, Hkv, D) strided views
    (Hkv-stride 0 allowed); ``v is k1`` means V aliases K1. out (B, H, DV) is written.
    """
    B, H, D1 = q1.shape
    Hkv = k1.shape[2]
    G = H // Hkv
    DV = out.shape[-1]
    v_is_k1 = v is k1
    has_k2 = q2 is not None
    for t in (q1, k1, v, out) + ((q2, k2) if has_k2 else ()):
        assert t.stride(-1) == 1, "the last dim must be contiguous"
    BLOCK_H = min(64, pow2(G))
    n_hblk = triton.cdiv(G, BLOCK_H)
    D2 = q2.shape[-1] if has_k2 else 0
    (BLOCK_D1, d1_tail), BLOCK_D2, BLOCK_DV = tiles(D1), pow2(D2), pow2(DV)
    if v_is_k1:
        BLOCK_DV = BLOCK_D1
    if num_splits is None:
        num_splits = choose_num_splits(B, Hkv * n_hblk, k1.shape[1], q1.device)
    num_splits = int(num_splits)
    # Key tile: 64 (32 for wide latents), smaller when a split is short at S_max.
    BLOCK_N = min(32 if max(BLOCK_D1 + d1_tail, BLOCK_DV) >= 256 else 64,
                  pow2(triton.cdiv(k1.shape[1], num_splits)))
    if num_splits == 1:
        o_part, lse = out.unsqueeze(2), None
    else:
        if workspace is None:
            workspace = decode_workspace(B, H, DV, num_splits, q1.device)
        o_part, lse = workspace[0][:B, :H, :num_splits], workspace[1][:B, :H, :num_splits]
    lse_arg = lse if lse is not None else torch.empty(0, device=q1.device, dtype=torch.float32)
    sl = lse.stride() if lse is not None else (0, 0, 0)
    q2a, k2a = (q2, k2) if has_k2 else (q1, k1)
    grid = (B, Hkv * n_hblk, num_splits)
    _split_kv_kernel[grid](
        q1, q2a, k1, k2a, v, kv_lens, o_part, lse_arg,
        G, n_hblk, D1, D2, DV, num_splits, scale * LOG2E,
        q1.stride(0), q1.stride(1), q2a.stride(0), q2a.stride(1),
        k1.stride(0), k1.stride(1), k1.stride(2), k2a.stride(0), k2a.stride(1), k2a.stride(2),
        v.stride(0), v.stride(1), v.stride(2),
        o_part.stride(0), o_part.stride(1), o_part.stride(2), sl[0], sl[1], sl[2],
        BLOCK_H=BLOCK_H, BLOCK_N=BLOCK_N, BLOCK_D1=BLOCK_D1, BLOCK_D2=BLOCK_D2,
        BLOCK_DV=BLOCK_DV, BLOCK_D1_TAIL=d1_tail, HAS_K2=has_k2, V_IS_K1=v_is_k1,
        WRITE_LSE=num_splits > 1, IP=input_precision(q1.dtype), num_warps=4, num_stages=2)
    if num_splits > 1:
        combine_splits(o_part, lse, out)
    return out

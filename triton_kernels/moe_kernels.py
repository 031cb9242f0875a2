"""Triton kernels of the MoE FFN (launched by ``mythos_rt.triton_kernels.moe``): the
fused router, the grouped SwiGLU GEMMs and the fixed-order combine. The alignment
kernels between the router and the GEMMs are in ``moe_align``.
"""

from __future__ import annotations

import triton
import triton.language as tl

ROUTER_BLOCK_T = 16            # tokens per router program = tokens per histogram chunk


@triton.jit
def _router_kernel(x_ptr, w_ptr, bias_ptr, ids_ptr, wts_ptr, hist_ptr,
                   N, D, E, E_LO, E_HIST, stride_xn,
                   TOP_K: tl.constexpr, K_PAD: tl.constexpr, BLOCK_T: tl.constexpr,
                   BLOCK_D: tl.constexpr, E_PAD: tl.constexpr, WRITE_HIST: tl.constexpr,
                   DOT_PREC: tl.constexpr):
    pid = tl.program_id(0)
    t = pid * BLOCK_T + tl.arange(0, BLOCK_T)
    tm = t < N
    e = tl.arange(0, E_PAD)
    em = e < E
    dd = tl.arange(0, BLOCK_D)
    acc = tl.zeros((BLOCK_T, E_PAD), dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        d = d0 + dd
        dm = d < D
        xa = tl.load(x_ptr + t[:, None].to(tl.int64) * stride_xn + d[None, :],
                     mask=tm[:, None] & dm[None, :], other=0.0)
        wb = tl.load(w_ptr + e[None, :] * D + d[:, None],
                     mask=em[None, :] & dm[:, None], other=0.0)          # (BLOCK_D, E_PAD)
        acc = tl.dot(xa, wb, acc, input_precision=DOT_PREC)
    neg_inf = float("-inf")
    logits = tl.where(em[None, :], acc, neg_inf)
    mx = tl.max(logits, axis=1)
    p = tl.exp(logits - mx[:, None])
    p = p / tl.sum(p, axis=1)[:, None]
    bias = tl.load(bias_ptr + e, mask=em, other=0.0)
    biased = tl.where(em[None, :], acc + bias[None, :], neg_inf)
    kc = tl.arange(0, K_PAD)
    sel_w = tl.zeros((BLOCK_T, K_PAD), dtype=tl.float32)
    sel_i = tl.zeros((BLOCK_T, K_PAD), dtype=tl.int32)
    hist = tl.zeros((E_PAD,), dtype=tl.int32)
    for j in tl.static_range(TOP_K):
        m = tl.max(biased, axis=1)
        idx = tl.min(tl.where(biased == m[:, None], e[None, :], E_PAD), axis=1)
        hit = e[None, :] == idx[:, None]
        pj = tl.sum(tl.where(hit, p, 0.0), axis=1)
        sel_w = tl.where(kc[None, :] == j, pj[:, None], sel_w)
        sel_i = tl.where(kc[None, :] == j, idx[:, None], sel_i)
        biased = tl.where(hit, neg_inf, biased)
        hist += tl.sum((hit & tm[:, None]).to(tl.int32), axis=0)
    sel_w = sel_w / tl.sum(sel_w, axis=1)[:, None]
    om = tm[:, None] & (kc[None, :] < TOP_K)
    offs = t[:, None] * TOP_K + kc[None, :]
    tl.store(ids_ptr + offs, sel_i, mask=om)
    tl.store(wts_ptr + offs, sel_w, mask=om)
    if WRITE_HIST:  # the held experts' columns [E_LO, E_LO + E_HIST) (a shard's)
        tl.store(hist_ptr + pid * E_HIST + (e - E_LO), hist,
                 mask=em & (e >= E_LO) & (e < E_LO + E_HIST))


@triton.jit
def _gemm1_kernel(x_ptr, w13_ptr, h_ptr, sorted_ptr, block_expert_ptr, skip_ptr,
                  D, I, n_tiles, stride_xn, stride_we, stride_hn,
                  SLOTS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                  BLOCK_K: tl.constexpr, DOT_PREC: tl.constexpr, HAS_SKIP: tl.constexpr):
    # 1-D grid, N tiles fastest: a block's x rows stay in L2 across its I tiles and an
    # expert's consecutive blocks share its weight tiles within a wave.
    pid = tl.program_id(0)
    pid_m = pid // n_tiles
    pid_n = pid % n_tiles
    ex = tl.load(block_expert_ptr + pid_m)
    if HAS_SKIP:  # a call with no real row: every block is dead
        ex = tl.where(tl.load(skip_ptr) != 0, -1, ex)
    if ex < 0:
        return
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    pair = tl.load(sorted_ptr + rows)
    valid = pair >= 0
    pair = tl.where(valid, pair, 0)
    tok = (pair // SLOTS).to(tl.int64)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    cm = cols < I
    kk = tl.arange(0, BLOCK_K)
    x_ptrs = x_ptr + tok[:, None] * stride_xn + kk[None, :]
    wg_ptrs = w13_ptr + ex.to(tl.int64) * stride_we + cols[None, :] * D + kk[:, None]
    wu_ptrs = wg_ptrs + I * D
    acc_g = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_u = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, D, BLOCK_K):
        km = kk < D - k0
        a = tl.load(x_ptrs, mask=km[None, :], other=0.0)
        bg = tl.load(wg_ptrs, mask=km[:, None] & cm[None, :], other=0.0)
        bu = tl.load(wu_ptrs, mask=km[:, None] & cm[None, :], other=0.0)
        acc_g = tl.dot(a, bg, acc_g, input_precision=DOT_PREC)
        acc_u = tl.dot(a, bu, acc_u, input_precision=DOT_PREC)
        x_ptrs += BLOCK_K
        wg_ptrs += BLOCK_K
        wu_ptrs += BLOCK_K
    hval = acc_g * tl.sigmoid(acc_g) * acc_u
    tl.store(h_ptr + pair.to(tl.int64)[:, None] * stride_hn + cols[None, :],
             hval.to(h_ptr.dtype.element_ty), mask=valid[:, None] & cm[None, :])


@triton.jit
def _gemm2_routed_kernel(h_ptr, w2_ptr, y_ptr, wts_ptr, sorted_ptr, block_expert_ptr,
                         skip_ptr, D, I, E, n_tiles, stride_hn, stride_we, stride_yn,
                         TOP_K: tl.constexpr, SLOTS: tl.constexpr, BLOCK_M: tl.constexpr,
                         BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                         DOT_PREC: tl.constexpr, HAS_SKIP: tl.constexpr):
    pid = tl.program_id(0)
    pid_m = pid // n_tiles
    pid_n = pid % n_tiles
    ex = tl.load(block_expert_ptr + pid_m)
    if HAS_SKIP:
        ex = tl.where(tl.load(skip_ptr) != 0, -1, ex)
    if (ex < 0) | (ex >= E):
        return
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    pair = tl.load(sorted_ptr + rows)
    valid = pair >= 0
    pair = tl.where(valid, pair, 0)
    ridx = (pair // SLOTS) * TOP_K + pair % SLOTS
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    cm = cols < D
    kk = tl.arange(0, BLOCK_K)
    a_ptrs = h_ptr + pair.to(tl.int64)[:, None] * stride_hn + kk[None, :]
    b_ptrs = w2_ptr + ex.to(tl.int64) * stride_we + cols[None, :] * I + kk[:, None]
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, I, BLOCK_K):
        km = kk < I - k0
        a = tl.load(a_ptrs, mask=km[None, :], other=0.0)
        b = tl.load(b_ptrs, mask=km[:, None] & cm[None, :], other=0.0)
        acc = tl.dot(a, b, acc, input_precision=DOT_PREC)
        a_ptrs += BLOCK_K
        b_ptrs += BLOCK_K
    wt = tl.load(wts_ptr + ridx, mask=valid, other=0.0)
    acc = acc * wt[:, None]
    tl.store(y_ptr + ridx.to(tl.int64)[:, None] * stride_yn + cols[None, :],
             acc.to(y_ptr.dtype.element_ty), mask=valid[:, None] & cm[None, :])


@triton.jit
def _gemm2_shared_kernel(h_ptr, w2_ptr, ys_ptr, skip_ptr, N, D, I, E, S, SPS,
                         stride_hn, stride_we, stride_yn,
                         TOP_K: tl.constexpr, SLOTS: tl.constexpr, BLOCK_M: tl.constexpr,
                         BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                         GROUP_M: tl.constexpr, DOT_PREC: tl.constexpr,
                         HAS_SKIP: tl.constexpr):
    # grouped ordering (GROUP_M token blocks × all D tiles per group) so both the
    # K-concatenated shared weights and the h rows are reused from L2 at large N
    pid = tl.program_id(0)
    pid_s = tl.program_id(1)
    num_m = tl.cdiv(N, BLOCK_M)
    num_n = tl.cdiv(D, BLOCK_N)
    in_group = GROUP_M * num_n
    first_m = (pid // in_group) * GROUP_M
    gsz = tl.minimum(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % in_group) % gsz
    pid_n = (pid % in_group) // gsz
    toks = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    tmask = toks < N
    t = tl.where(tmask, toks, 0).to(tl.int64)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    cm = cols < D
    kk = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    s_lo = pid_s * SPS
    s_hi = tl.minimum(S, s_lo + SPS)
    if HAS_SKIP:  # no real row: no slot, zeros stored (no weight read)
        s_hi = tl.where(tl.load(skip_ptr) != 0, s_lo, s_hi)
    for s in range(s_lo, s_hi):
        a_ptrs = h_ptr + (t * SLOTS + TOP_K + s)[:, None] * stride_hn + kk[None, :]
        b_ptrs = w2_ptr + (E + s).to(tl.int64) * stride_we + cols[None, :] * I + kk[:, None]
        for k0 in range(0, I, BLOCK_K):
            km = kk < I - k0
            a = tl.load(a_ptrs, mask=km[None, :], other=0.0)
            b = tl.load(b_ptrs, mask=km[:, None] & cm[None, :], other=0.0)
            acc = tl.dot(a, b, acc, input_precision=DOT_PREC)
            a_ptrs += BLOCK_K
            b_ptrs += BLOCK_K
    out_rows = (pid_s * N + toks).to(tl.int64)
    tl.store(ys_ptr + out_rows[:, None] * stride_yn + cols[None, :],
             acc.to(ys_ptr.dtype.element_ty), mask=tmask[:, None] & cm[None, :])


@triton.jit
def _combine_kernel(yr_ptr, ys_ptr, out_ptr, ids_ptr, skip_ptr, N, D, n_split, E_LO, E_LOCAL,
                    stride_yr, stride_ys, stride_on,
                    TOP_K: tl.constexpr, BLOCK_D: tl.constexpr, SHARD: tl.constexpr,
                    HAS_SKIP: tl.constexpr):
    # SHARD: an expert shard computed only the slots routed to its experts
    # [E_LO, E_LO + E_LOCAL); the others (never written) add zero here. HAS_SKIP: when
    # the call has no real row the routed slots were never written: zeros are stored.
    n = tl.program_id(0)
    d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    dm = d < D
    live = dm
    if HAS_SKIP:  # a block, not a scalar, in the mask (see SHARD below)
        live = dm & (tl.load(skip_ptr) + 0 * d == 0)
    base = n.to(tl.int64) * TOP_K
    acc = tl.zeros((BLOCK_D,), dtype=tl.float32)
    for j in tl.static_range(TOP_K):
        held = live
        if SHARD:
            # a block of expert ids, not a scalar: Triton 3.9's interpreter rejects
            # a block mask & a scalar comparison ("mask has unsupported dtype")
            ex = tl.load(ids_ptr + base + j) - E_LO + 0 * d
            held = live & (ex >= 0) & (ex < E_LOCAL)
        acc += tl.load(yr_ptr + (base + j) * stride_yr + d, mask=held, other=0.0).to(tl.float32)
    for s in range(0, n_split):
        row = (s * N + n).to(tl.int64)
        acc += tl.load(ys_ptr + row * stride_ys + d, mask=dm, other=0.0).to(tl.float32)
    tl.store(out_ptr + n.to(tl.int64) * stride_on + d, acc.to(out_ptr.dtype.element_ty),
             mask=dm)

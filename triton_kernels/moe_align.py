"""Sync-free alignment of the MoE's (token, slot) pairs by expert: a one-program scan
(counts, padded segment offsets, scatter bases, the block → expert table) and a stable
counting-sort scatter, both from the router's per-chunk histogram."""

from __future__ import annotations

from typing import Tuple

import torch
import triton
import triton.language as tl

from mythos_rt.ops.moe import PackedMoE

from . import interpreted
from .moe_kernels import ROUTER_BLOCK_T
from .split_kv import pow2


@triton.jit
def _align_scan_kernel(hist_ptr, base_ptr, counts_ptr, offsets_ptr, sorted_ptr,
                       block_expert_ptr, n_chunks, N, E, S, RB_MAX, SB_PER,
                       BLOCK_M: tl.constexpr, E_PAD: tl.constexpr, S_PAD: tl.constexpr,
                       CB: tl.constexpr, BB: tl.constexpr):
    e = tl.arange(0, E_PAD)
    em = e < E
    cc = tl.arange(0, CB)
    total = tl.zeros((E_PAD,), dtype=tl.int32)
    for c0 in range(0, n_chunks, CB):
        c = c0 + cc
        h = tl.load(hist_ptr + c[:, None] * E + e[None, :],
                    mask=(c < n_chunks)[:, None] & em[None, :], other=0)
        total += tl.sum(h, axis=0)
    padded = (total + BLOCK_M - 1) // BLOCK_M * BLOCK_M
    ends = tl.cumsum(padded, axis=0)
    starts = ends - padded
    tl.store(counts_ptr + e, total, mask=em)
    tl.store(offsets_ptr + e, starts, mask=em)
    # per-chunk scatter bases: segment start + pairs of this expert in earlier chunks
    running = starts
    for c0 in range(0, n_chunks, CB):
        c = c0 + cc
        cm = (c < n_chunks)[:, None] & em[None, :]
        h = tl.load(hist_ptr + c[:, None] * E + e[None, :], mask=cm, other=0)
        incl = tl.cumsum(h, axis=0)
        tl.store(base_ptr + c[:, None] * E + e[None, :], running[None, :] + incl - h, mask=cm)
        running += tl.sum(h, axis=0)
    # padding rows of each live routed segment -> -1
    r = tl.arange(0, BLOCK_M)
    tl.store(sorted_ptr + (starts + total)[:, None] + r[None, :],
             tl.full((E_PAD, BLOCK_M), -1, tl.int32),
             mask=em[:, None] & ((total[:, None] + r[None, :]) < padded[:, None]))
    # block -> expert table, routed region [0, RB_MAX): -1 past the live blocks
    bb = tl.arange(0, BB)
    for b0 in range(0, RB_MAX, BB):
        b = b0 + bb
        row = b * BLOCK_M
        ex = tl.sum(((ends[None, :] <= row[:, None]) & em[None, :]).to(tl.int32), axis=1)
        ex = tl.where(ex < E, ex, -1)
        tl.store(block_expert_ptr + b, ex, mask=b < RB_MAX)
    # shared slots: fixed segments of cdiv(N, BLOCK_M) blocks after the routed region
    s = tl.arange(0, S_PAD)
    sm = s < S
    tl.store(counts_ptr + E + s, tl.full((S_PAD,), 0, tl.int32) + N, mask=sm)
    tl.store(offsets_ptr + E + s, RB_MAX * BLOCK_M + s * (SB_PER * BLOCK_M), mask=sm)
    for b0 in range(0, S * SB_PER, BB):
        b = b0 + bb
        tl.store(block_expert_ptr + RB_MAX + b, E + b // SB_PER, mask=b < S * SB_PER)


@triton.jit
def _align_scatter_kernel(ids_ptr, base_ptr, sorted_ptr, N, E, E_LO, S, n_chunks, RB_MAX,
                          SB_PER,
                          TOP_K: tl.constexpr, SLOTS: tl.constexpr, BLOCK_M: tl.constexpr,
                          CHUNK_T: tl.constexpr, PAIRS_PAD: tl.constexpr,
                          E_PAD: tl.constexpr, SH_BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    if pid < n_chunks:
        i = tl.arange(0, PAIRS_PAD)
        q = pid * (CHUNK_T * TOP_K) + i
        qm = (i < CHUNK_T * TOP_K) & (q < N * TOP_K)
        ex = tl.load(ids_ptr + q, mask=qm, other=-1) - E_LO
        qm = qm & (ex >= 0) & (ex < E)  # pairs of experts held here (a shard: its range)
        ex = tl.where(qm, ex, -1)
        e = tl.arange(0, E_PAD)
        onehot = (ex[:, None] == e[None, :]).to(tl.int32)
        rank = tl.cumsum(onehot, axis=0)                       # inclusive, stable
        base = tl.load(base_ptr + pid * E + e, mask=e < E, other=0)
        pos = tl.sum(onehot * (base[None, :] + rank - 1), axis=1)
        pair = (q // TOP_K) * SLOTS + q % TOP_K
        tl.store(sorted_ptr + pos, pair, mask=qm)
    else:
        j = (pid - n_chunks) * SH_BLOCK + tl.arange(0, SH_BLOCK)
        seg = SB_PER * BLOCK_M
        jm = j < S * seg
        s = j // seg
        t = j % seg
        val = tl.where(t < N, t * SLOTS + TOP_K + s, -1)
        tl.store(sorted_ptr + RB_MAX * BLOCK_M + j, val, mask=jm)


def routed_blocks(n_tokens: int, E: int, k: int, bm: int) -> int:
    p = n_tokens * k
    return triton.cdiv(p, bm) + min(E, p)


def moe_align_triton(n_tokens: int, ids: torch.Tensor, hist: torch.Tensor, ws: "MoEWorkspace",
                     packed: PackedMoE, block_m: int) -> Tuple[int, int]:
    """Sort (token, slot) pairs by expert into ``ws`` (counts, offsets, sorted_pairs,
    block_expert); ``hist`` is the router's per-chunk histogram of the held experts.
    Returns the static grid sizes (routed blocks upper bound, total blocks).
    Device-only; no host sync.

    An expert shard (``packed.is_shard``) sorts only the pairs routed to its experts
    ``expert_start + [0, n_local)``, numbered from 0 as its weights are; the other pairs
    are another rank's and appear nowhere.
    """
    E, k, S = packed.n_local, packed.top_k, packed.n_shared_slots
    N, bm = n_tokens, block_m
    n_chunks = triton.cdiv(N, ROUTER_BLOCK_T)
    rb_max = routed_blocks(N, E, k, bm)
    sb_per = triton.cdiv(N, bm)
    e_pad = pow2(E, 16)
    # One program holds CB×E_PAD histogram and BB×E_PAD comparison tiles: sized by E_PAD
    # to ~16 values per thread on 8 warps (64×64 blocks at 4 warps took 255 registers
    # and spilled, more with more experts).
    cb, bb, nw = ((16, 64, 4) if interpreted() else
                  (max(8, 2048 // e_pad), max(16, 4096 // e_pad), 8))
    _align_scan_kernel[(1,)](
        hist, ws.base, ws.counts, ws.offsets, ws.sorted_pairs, ws.block_expert,
        n_chunks, N, E, S, rb_max, sb_per,
        BLOCK_M=bm, E_PAD=e_pad, S_PAD=pow2(S, 1), CB=cb, BB=bb, num_warps=nw)
    sh_block = 256 if interpreted() else 1024
    n_sh = triton.cdiv(S * sb_per * bm, sh_block)
    _align_scatter_kernel[(n_chunks + n_sh,)](
        ids, ws.base, ws.sorted_pairs, N, E, packed.expert_start, S, n_chunks, rb_max, sb_per,
        TOP_K=k, SLOTS=k + S, BLOCK_M=bm, CHUNK_T=ROUTER_BLOCK_T,
        PAIRS_PAD=pow2(ROUTER_BLOCK_T * k, 1), E_PAD=e_pad, SH_BLOCK=sh_block, num_warps=4)
    return rb_max, rb_max + S * sb_per

"""Triton MoE FFN: fused router, sync-free alignment, grouped SwiGLU GEMMs, fixed-order combine.

Pipeline of ``moe_ffn_triton`` (7 launches, no host sync, no allocation given a workspace
and ``out``; grids depend only on N and static upper bounds, so it is CUDA-graph safe):

1. ``_router_kernel``   (cdiv(N,16),): logits = x·Wᵀ (fp32 accumulate), fp32 softmax,
   top-k on biased logits by repeated argmax (ties → lowest id), renormalize; writes
   ids (N,k) int32, weights (N,k) fp32 and a per-16-token-chunk expert histogram.
2. ``_align_scan_kernel`` (1,): per-expert counts, BLOCK_M-padded segment offsets, the
   per-chunk scatter bases, the block→expert table (-1 = dead block) and -1 in the
   padding rows of live segments. Shared slots get fixed segments after the routed region.
3. ``_align_scatter_kernel``: stable counting-sort scatter of routed pairs (token-major
   within an expert) and the static shared-slot segments into ``sorted_pairs``.
4. ``_gemm1_kernel`` (blocks·cdiv(I,BN1), I tiles fastest): gathered x rows × [gate; up][e]ᵀ, epilogue
   silu(gate)·up → ``h[pair]`` (pair = token·(k+S) + slot).
5. ``_gemm2_routed_kernel`` (routed blocks·cdiv(D,BN2)): h[pair] × down[e]ᵀ × weight →
   ``y_routed[token·k + slot]`` (fp32 partials).
6. ``_gemm2_shared_kernel`` (cdiv(N,BMS)·cdiv(D,BN2) grouped, split): dense over tokens, the
   shared slots concatenated along K (split over ``split`` programs for small N).
7. ``_combine_kernel``: out = ((y0 + y1) + … + y_{k-1}) + shared partials, in that fixed
   order, fp32 → out dtype. No float atomics anywhere: runs are bitwise reproducible.

Upper bounds (P = N·k routed pairs, BM = BLOCK_M): routed blocks ≤ cdiv(P,BM) + min(E,P);
shared blocks = S·cdiv(N,BM). Blocks past the live count read expert -1 and exit.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, replace
from typing import Dict, Iterable, Optional, Sequence, Tuple

import torch
import triton
import triton.language as tl

from mythos_rt.cache import cache_dir, write_atomic
from mythos_rt.ops.moe import PackedMoE

from . import interpreted

__all__ = ["MoEConfig", "MoEWorkspace", "moe_route_triton", "moe_ffn_triton",
           "moe_align_triton", "get_config", "heuristic_config", "autotune_moe",
           "cache_path", "ROUTER_BLOCK_T", "BLOCK_M_CHOICES"]

ROUTER_BLOCK_T = 16            # tokens per router program = tokens per histogram chunk
BLOCK_M_CHOICES = (16, 32, 64, 128)
_SHARED_SPLIT_TOKENS = 256     # y_shared holds S·min(max_tokens, this) rows for split-K


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _pow2(n: int, lo: int = 1) -> int:
    return max(lo, triton.next_power_of_2(max(1, n)))


def _dot_prec(dtype: torch.dtype) -> str:
    # fp32 storage: exact fp32 products (the GPU default would be tf32); 16-bit: ignored.
    return "ieee" if dtype == torch.float32 else "tf32"


# ---------------------------------------------------------------------------------------
# kernels
# ---------------------------------------------------------------------------------------

@triton.jit
def _router_kernel(x_ptr, w_ptr, bias_ptr, ids_ptr, wts_ptr, hist_ptr,
                   N, D, E, stride_xn,
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
    if WRITE_HIST:
        tl.store(hist_ptr + pid * E + e, hist, mask=em)


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
def _align_scatter_kernel(ids_ptr, base_ptr, sorted_ptr, N, E, S, n_chunks, RB_MAX, SB_PER,
                          TOP_K: tl.constexpr, SLOTS: tl.constexpr, BLOCK_M: tl.constexpr,
                          CHUNK_T: tl.constexpr, PAIRS_PAD: tl.constexpr,
                          E_PAD: tl.constexpr, SH_BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    if pid < n_chunks:
        i = tl.arange(0, PAIRS_PAD)
        q = pid * (CHUNK_T * TOP_K) + i
        qm = (i < CHUNK_T * TOP_K) & (q < N * TOP_K)
        ex = tl.load(ids_ptr + q, mask=qm, other=-1)
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


@triton.jit
def _gemm1_kernel(x_ptr, w13_ptr, h_ptr, sorted_ptr, block_expert_ptr,
                  D, I, n_tiles, stride_xn, stride_we, stride_hn,
                  SLOTS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                  BLOCK_K: tl.constexpr, DOT_PREC: tl.constexpr):
    # 1-D grid, N tiles fastest: a block's x rows stay in L2 across its I tiles and an
    # expert's consecutive blocks share its weight tiles within a wave.
    pid = tl.program_id(0)
    pid_m = pid // n_tiles
    pid_n = pid % n_tiles
    ex = tl.load(block_expert_ptr + pid_m)
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
                         D, I, E, n_tiles, stride_hn, stride_we, stride_yn,
                         TOP_K: tl.constexpr, SLOTS: tl.constexpr, BLOCK_M: tl.constexpr,
                         BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                         DOT_PREC: tl.constexpr):
    pid = tl.program_id(0)
    pid_m = pid // n_tiles
    pid_n = pid % n_tiles
    ex = tl.load(block_expert_ptr + pid_m)
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
def _gemm2_shared_kernel(h_ptr, w2_ptr, ys_ptr, N, D, I, E, S, SPS,
                         stride_hn, stride_we, stride_yn,
                         TOP_K: tl.constexpr, SLOTS: tl.constexpr, BLOCK_M: tl.constexpr,
                         BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                         GROUP_M: tl.constexpr, DOT_PREC: tl.constexpr):
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
def _combine_kernel(yr_ptr, ys_ptr, out_ptr, N, D, n_split,
                    stride_yr, stride_ys, stride_on,
                    TOP_K: tl.constexpr, BLOCK_D: tl.constexpr):
    n = tl.program_id(0)
    d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    dm = d < D
    base = n.to(tl.int64) * TOP_K
    acc = tl.load(yr_ptr + base * stride_yr + d, mask=dm, other=0.0).to(tl.float32)
    for j in tl.static_range(1, TOP_K):
        acc += tl.load(yr_ptr + (base + j) * stride_yr + d, mask=dm, other=0.0).to(tl.float32)
    for s in range(0, n_split):
        row = (s * N + n).to(tl.int64)
        acc += tl.load(ys_ptr + row * stride_ys + d, mask=dm, other=0.0).to(tl.float32)
    tl.store(out_ptr + n.to(tl.int64) * stride_on + d, acc.to(out_ptr.dtype.element_ty),
             mask=dm)


# ---------------------------------------------------------------------------------------
# configs: heuristic, interpreter, autotuned (persistent JSON cache)
# ---------------------------------------------------------------------------------------

@dataclass(frozen=True)
class MoEConfig:
    """Tile sizes of one MoE launch sequence.

    block_m: sorted-pair rows per block (alignment padding, GEMM1, routed GEMM2);
    block_n1/block_k1: I columns (each of gate and up) / D chunk of GEMM1;
    block_n2/block_k2: D columns / I chunk of both GEMM2s; block_m_shared: tokens per
    shared-GEMM2 block; split_shared: programs the shared slots are split over (fp32
    partials summed in the combine); num_warps/num_stages: for every GEMM.
    """
    block_m: int = 16
    block_n1: int = 64
    block_k1: int = 128
    block_n2: int = 64
    block_k2: int = 128
    block_m_shared: int = 16
    split_shared: int = 1
    num_warps: int = 4
    num_stages: int = 3

    def to_dict(self) -> dict:
        return asdict(self)


INTERPRETER_CONFIG = MoEConfig(block_m=16, block_n1=32, block_k1=32, block_n2=32,
                               block_k2=32, block_m_shared=16, split_shared=2,
                               num_warps=4, num_stages=1)


def _shared_split(n_tokens: int, S: int, cfg: MoEConfig, D: int, cap_rows: int,
                  target_programs: int = 264) -> int:
    """How many programs to split the shared slots over: enough to fill the GPU, ≤ S."""
    if S == 0:
        return 1
    tiles = _cdiv(n_tokens, cfg.block_m_shared) * _cdiv(D, cfg.block_n2)
    split = min(S, max(1, _cdiv(target_programs, tiles)), max(1, cap_rows // n_tokens))
    return _cdiv(S, _cdiv(S, split))   # no empty splits


def heuristic_config(n_tokens: int, dim: int, expert_dim: int, n_routed: int, top_k: int,
                     n_shared_slots: int, dtype: torch.dtype) -> MoEConfig:
    """A reasonable GPU config by the average pairs per routed expert (no tuning)."""
    avg = n_tokens * top_k / max(1, n_routed)
    wide = 2 if dtype == torch.float32 else 1   # fp32 tiles are twice the bytes
    if avg <= 16:      # decode: memory bound, tiny M, wide K tiles, many programs
        cfg = MoEConfig(block_m=16, block_n1=64, block_k1=128 // wide, block_n2=32,
                        block_k2=256 // wide, block_m_shared=16, num_warps=4, num_stages=4)
    elif avg <= 48:
        cfg = MoEConfig(block_m=32, block_n1=64, block_k1=128 // wide, block_n2=64,
                        block_k2=128 // wide, block_m_shared=32, num_warps=4, num_stages=4)
    elif avg <= 160:
        cfg = MoEConfig(block_m=64, block_n1=64, block_k1=64, block_n2=128, block_k2=64,
                        block_m_shared=64, num_warps=4, num_stages=4)
    else:              # prefill: tensor-core bound
        cfg = MoEConfig(block_m=128, block_n1=64, block_k1=64, block_n2=128, block_k2=64,
                        block_m_shared=128, num_warps=8, num_stages=3)
    return cfg


def cache_path() -> str:
    """``moe.json`` in the autotune cache (``mythos_rt.cache``)."""
    return str(cache_dir("autotune") / "moe.json")


_CACHE: Dict[str, Dict[str, dict]] = {}   # path -> {key: config dict}


def _load_cache(path: str) -> Dict[str, dict]:
    if path not in _CACHE:
        try:
            with open(path, encoding="utf-8") as f:
                data = json.load(f)
            _CACHE[path] = data if isinstance(data, dict) else {}
        except (OSError, ValueError):
            _CACHE[path] = {}
    return _CACHE[path]


def _save_cache(path: str, entries: Dict[str, dict]) -> None:
    merged = {}
    try:
        with open(path, encoding="utf-8") as f:
            merged = json.load(f)
    except (OSError, ValueError):
        pass
    merged.update(entries)
    write_atomic(path, json.dumps(merged, indent=1, sort_keys=True))
    _CACHE[path] = merged


def _config_from(entry: dict) -> Optional[MoEConfig]:
    """A cache entry -> MoEConfig (keys starting with '_' are notes, e.g. '_ms'); None if bad."""
    try:
        cfg = MoEConfig(**{f: v for f, v in entry.items() if not f.startswith("_")})
    except TypeError:
        return None
    return cfg if cfg.block_m in BLOCK_M_CHOICES else None


def token_bucket(n_tokens: int) -> int:
    """Configs are chosen per power-of-two token bucket (1, 2, 4, …)."""
    return 1 << max(0, (max(1, n_tokens) - 1).bit_length())


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device).replace(" ", "_")
    return device.type


def config_key(n_tokens: int, packed: PackedMoE, dtype: torch.dtype,
               device: torch.device) -> str:
    return (f"{_device_name(torch.device(device))}|n{token_bucket(n_tokens)}|D{packed.dim}"
            f"|I{packed.expert_dim}|E{packed.n_routed}|k{packed.top_k}"
            f"|S{packed.n_shared_slots}|{str(dtype).replace('torch.', '')}")


def get_config(n_tokens: int, packed: PackedMoE, dtype: torch.dtype,
               device: torch.device | str, path: Optional[str] = None,
               tuned: Optional[Dict[str, dict]] = None) -> MoEConfig:
    """The config for this call: fixed under the interpreter, else a hit in ``tuned``, a
    cache hit or the heuristic.

    Never tunes (tuning is ``autotune_moe``, a compile-time step); host-only, no sync.
    """
    if interpreted() or torch.device(device).type != "cuda":
        return INTERPRETER_CONFIG
    key = config_key(n_tokens, packed, dtype, device)
    hit = (tuned or {}).get(key)
    if hit is None:
        hit = _load_cache(path or cache_path()).get(key)
    cfg = _config_from(hit) if hit is not None else None
    if cfg is not None:
        return cfg
    return heuristic_config(n_tokens, packed.dim, packed.expert_dim, packed.n_routed,
                            packed.top_k, packed.n_shared_slots, dtype)


# ---------------------------------------------------------------------------------------
# workspace
# ---------------------------------------------------------------------------------------

def _routed_blocks(n_tokens: int, E: int, k: int, bm: int) -> int:
    p = n_tokens * k
    return _cdiv(p, bm) + min(E, p)


@dataclass
class MoEWorkspace:
    """Every buffer one ``moe_ffn_triton`` call touches, sized for ``max_tokens``.

    Allocate once (``MoEWorkspace.allocate``) and reuse: calls with N ≤ max_tokens then
    allocate nothing, which is what CUDA-graph capture needs. ``config`` (optional) pins
    the tile config instead of ``get_config``'s choice; ``tuned`` (optional, a runtime's
    own table, e.g. its artifact's) is looked up before the autotune cache.
    """
    max_tokens: int
    ids: torch.Tensor            # (max_tokens, k) int32
    weights: torch.Tensor        # (max_tokens, k) float32
    hist: torch.Tensor           # (chunks, E) int32 per-16-token expert histogram
    base: torch.Tensor           # (chunks, E) int32 scatter bases
    counts: torch.Tensor         # (E_tot,) int32 pairs per expert (shared slots: N)
    offsets: torch.Tensor        # (E_tot,) int32 padded segment starts (rows)
    sorted_pairs: torch.Tensor   # (max_rows,) int32 pair ids (-1 = padding)
    block_expert: torch.Tensor   # (max_blocks,) int32 expert per block (-1 = dead)
    h: torch.Tensor              # (max_tokens·(k+S), I) storage dtype, row = pair id
    y_routed: torch.Tensor       # (max_tokens·k, D) partial dtype, weighted expert outputs
    y_shared: torch.Tensor       # (rows, D) partial dtype, shared-slot partial sums
    out: torch.Tensor            # (max_tokens, D) storage dtype, default output
    config: Optional[MoEConfig] = None
    tuned: Optional[Dict[str, dict]] = None

    @classmethod
    def allocate(cls, max_tokens: int, packed: PackedMoE,
                 device: Optional[torch.device | str] = None,
                 partial_dtype: torch.dtype = torch.float32,
                 config: Optional[MoEConfig] = None) -> "MoEWorkspace":
        """Preallocate for up to ``max_tokens`` tokens (any block_m in BLOCK_M_CHOICES)."""
        if max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {max_tokens}")
        device = torch.device(device) if device is not None else packed.device
        E, k, S, I, D = (packed.n_routed, packed.top_k, packed.n_shared_slots,
                         packed.expert_dim, packed.dim)
        chunks = _cdiv(max_tokens, ROUTER_BLOCK_T)
        rows = blocks = 0
        for bm in BLOCK_M_CHOICES:
            nb = _routed_blocks(max_tokens, E, k, bm) + S * _cdiv(max_tokens, bm)
            rows, blocks = max(rows, nb * bm), max(blocks, nb)
        ys_rows = max(1, S and max(max_tokens, S * min(max_tokens, _SHARED_SPLIT_TOKENS)))
        i32 = dict(dtype=torch.int32, device=device)
        return cls(
            max_tokens=max_tokens,
            ids=torch.empty(max_tokens, k, **i32),
            weights=torch.empty(max_tokens, k, dtype=torch.float32, device=device),
            hist=torch.empty(chunks, E, **i32),
            base=torch.empty(chunks, E, **i32),
            counts=torch.empty(E + S, **i32),
            offsets=torch.empty(E + S, **i32),
            sorted_pairs=torch.empty(rows, **i32),
            block_expert=torch.empty(blocks, **i32),
            h=torch.empty(max_tokens * (k + S), I, dtype=packed.dtype, device=device),
            y_routed=torch.empty(max_tokens * k, D, dtype=partial_dtype, device=device),
            y_shared=torch.empty(ys_rows, D, dtype=partial_dtype, device=device),
            out=torch.empty(max_tokens, D, dtype=packed.dtype, device=device),
            config=config)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (
            self.ids, self.weights, self.hist, self.base, self.counts, self.offsets,
            self.sorted_pairs, self.block_expert, self.h, self.y_routed, self.y_shared,
            self.out))


# ---------------------------------------------------------------------------------------
# launchers
# ---------------------------------------------------------------------------------------

def _router_block_d(D: int) -> int:
    return 32 if interpreted() else min(128, _pow2(D, 16))


def _launch_router(x, router_w, router_bias, top_k, ids, wts, hist, write_hist: bool):
    N, D = x.shape
    E = router_w.shape[0]
    _router_kernel[(_cdiv(N, ROUTER_BLOCK_T),)](
        x, router_w, router_bias, ids, wts, hist, N, D, E, x.stride(0),
        TOP_K=top_k, K_PAD=_pow2(top_k), BLOCK_T=ROUTER_BLOCK_T,
        BLOCK_D=_router_block_d(D), E_PAD=_pow2(E, 16), WRITE_HIST=write_hist,
        DOT_PREC=_dot_prec(x.dtype), num_warps=4)


def _check_route_inputs(x, router_w, router_bias, top_k):
    if x.dim() != 2 or x.stride(-1) != 1:
        raise ValueError(f"x must be (N, D) with unit last stride, got {tuple(x.shape)}")
    if router_w.dtype != x.dtype or router_w.shape[1] != x.shape[1] or not router_w.is_contiguous():
        raise ValueError("router_w must be a contiguous (E, D) tensor in x's dtype")
    if router_bias.dtype != torch.float32 or router_bias.numel() != router_w.shape[0]:
        raise ValueError("router_bias must be float32 (E,)")
    if not 1 <= top_k <= router_w.shape[0]:
        raise ValueError(f"top_k={top_k} must be in [1, E={router_w.shape[0]}]")


def moe_route_triton(x: torch.Tensor, router_w: torch.Tensor, router_bias: torch.Tensor,
                     top_k: int, out: Optional[Tuple[torch.Tensor, torch.Tensor]] = None):
    """Fused router (see ``mythos_rt.ops.moe.moe_route_torch`` for the contract).

    x (N, D), router_w (E, D) in x's dtype, router_bias (E,) fp32 →
    ids (N, k) int32 (descending biased logit; ties → lowest id), weights (N, k) fp32.
    ``out=(ids, weights)`` buffers of ≥ N rows make it allocation-free.
    """
    _check_route_inputs(x, router_w, router_bias, top_k)
    N = x.shape[0]
    if out is None:
        ids = torch.empty(N, top_k, dtype=torch.int32, device=x.device)
        wts = torch.empty(N, top_k, dtype=torch.float32, device=x.device)
    else:
        if out[0].shape[0] < N or out[1].shape[0] < N or out[0].shape[1] != top_k:
            raise ValueError(f"out buffers must hold ({N}, {top_k}) rows")
        ids, wts = out[0][:N], out[1][:N]
    if N:
        _launch_router(x, router_w, router_bias, top_k, ids, wts, ids, write_hist=False)
    return ids, wts


def moe_align_triton(n_tokens: int, ids: torch.Tensor, hist: torch.Tensor, ws: MoEWorkspace,
                     packed: PackedMoE, block_m: int) -> Tuple[int, int]:
    """Sort (token, slot) pairs by expert into ``ws`` (counts, offsets, sorted_pairs,
    block_expert); ``hist`` is the router's per-chunk histogram. Returns the static grid
    sizes (routed blocks upper bound, total blocks). Device-only; no host sync.
    """
    E, k, S = packed.n_routed, packed.top_k, packed.n_shared_slots
    N, bm = n_tokens, block_m
    n_chunks = _cdiv(N, ROUTER_BLOCK_T)
    rb_max = _routed_blocks(N, E, k, bm)
    sb_per = _cdiv(N, bm)
    e_pad = _pow2(E, 16)
    _align_scan_kernel[(1,)](
        hist, ws.base, ws.counts, ws.offsets, ws.sorted_pairs, ws.block_expert,
        n_chunks, N, E, S, rb_max, sb_per,
        BLOCK_M=bm, E_PAD=e_pad, S_PAD=_pow2(S), CB=16 if interpreted() else 64,
        BB=64 if interpreted() else 256, num_warps=4)
    sh_block = 256 if interpreted() else 1024
    n_sh = _cdiv(S * sb_per * bm, sh_block)
    _align_scatter_kernel[(n_chunks + n_sh,)](
        ids, ws.base, ws.sorted_pairs, N, E, S, n_chunks, rb_max, sb_per,
        TOP_K=k, SLOTS=k + S, BLOCK_M=bm, CHUNK_T=ROUTER_BLOCK_T,
        PAIRS_PAD=_pow2(ROUTER_BLOCK_T * k), E_PAD=e_pad, SH_BLOCK=sh_block, num_warps=4)
    return rb_max, rb_max + S * sb_per


def _moe_ffn_impl(x: torch.Tensor, packed: PackedMoE, ws: MoEWorkspace, out: torch.Tensor,
                  cfg: MoEConfig) -> torch.Tensor:
    N, D = x.shape
    E, k, S, I = packed.n_routed, packed.top_k, packed.n_shared_slots, packed.expert_dim
    slots = k + S
    prec = _dot_prec(x.dtype)
    ids, wts = ws.ids[:N], ws.weights[:N]
    _launch_router(x, packed.router_w, packed.router_bias, k, ids, wts, ws.hist,
                   write_hist=True)
    rb_max, n_blocks = moe_align_triton(N, ids, ws.hist, ws, packed, cfg.block_m)
    meta = dict(num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    n1 = _cdiv(I, cfg.block_n1)
    _gemm1_kernel[(n_blocks * n1,)](
        x, packed.w13, ws.h, ws.sorted_pairs, ws.block_expert,
        D, I, n1, x.stride(0), packed.w13.stride(0), ws.h.stride(0),
        SLOTS=slots, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n1, BLOCK_K=cfg.block_k1,
        DOT_PREC=prec, **meta)
    n2 = _cdiv(D, cfg.block_n2)
    _gemm2_routed_kernel[(rb_max * n2,)](
        ws.h, packed.w2, ws.y_routed, wts, ws.sorted_pairs, ws.block_expert,
        D, I, E, n2, ws.h.stride(0), packed.w2.stride(0), ws.y_routed.stride(0),
        TOP_K=k, SLOTS=slots, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n2,
        BLOCK_K=cfg.block_k2, DOT_PREC=prec, **meta)
    n_split = 0
    if S:
        split = max(1, min(cfg.split_shared, S, ws.y_shared.shape[0] // N))
        sps = _cdiv(S, split)
        n_split = _cdiv(S, sps)
        _gemm2_shared_kernel[(_cdiv(N, cfg.block_m_shared) * n2, n_split)](
            ws.h, packed.w2, ws.y_shared, N, D, I, E, S, sps,
            ws.h.stride(0), packed.w2.stride(0), ws.y_shared.stride(0),
            TOP_K=k, SLOTS=slots, BLOCK_M=cfg.block_m_shared, BLOCK_N=cfg.block_n2,
            BLOCK_K=cfg.block_k2, GROUP_M=8, DOT_PREC=prec, **meta)
    block_d = 64 if interpreted() else min(1024, _pow2(D, 16))
    _combine_kernel[(N, _cdiv(D, block_d))](
        ws.y_routed, ws.y_shared, out, N, D, n_split,
        ws.y_routed.stride(0), ws.y_shared.stride(0), out.stride(0),
        TOP_K=k, BLOCK_D=block_d, num_warps=4)
    return out


def _check_ws(ws: MoEWorkspace, packed: PackedMoE, N: int):
    E, k, S, I, D = (packed.n_routed, packed.top_k, packed.n_shared_slots,
                     packed.expert_dim, packed.dim)
    if N > ws.max_tokens:
        raise ValueError(f"{N} tokens exceed the workspace's max_tokens={ws.max_tokens}")
    if (ws.ids.shape[1] != k or ws.hist.shape[1] != E or ws.counts.numel() != E + S
            or ws.h.shape[1] != I or ws.out.shape[1] != D or ws.h.dtype != packed.dtype):
        raise ValueError("workspace was allocated for a different PackedMoE")


def moe_ffn_triton(x: torch.Tensor, packed: PackedMoE, workspace: Optional[MoEWorkspace] = None,
                   out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """MoE FFN with Triton kernels (same contract as ``mythos_rt.ops.moe.moe_ffn_torch``).

    Parameters
    ----------
    x : (N, D), unit last stride, in the packed weights' dtype (fp32/fp16/bf16).
    packed : ``PackedMoE`` on x's device.
    workspace : ``MoEWorkspace`` with max_tokens ≥ N. Without one, a temporary workspace
        is allocated (fine eagerly, not under CUDA-graph capture).
    out : optional (N, D) buffer in x's dtype, unit last stride. Without it the result
        is written to ``workspace.out[:N]`` (a view into the workspace, overwritten by
        the next call).

    Returns
    -------
    (N, D) in x's dtype. fp32 accumulation throughout; bitwise reproducible.
    """
    if x.dim() != 2 or x.stride(-1) != 1:
        raise ValueError(f"x must be (N, D) with unit last stride, got {tuple(x.shape)}")
    N, D = x.shape
    if D != packed.dim or x.dtype != packed.dtype or x.device != packed.device:
        raise ValueError(f"x {tuple(x.shape)} {x.dtype} on {x.device} does not match the packed "
                         f"weights (D={packed.dim}, {packed.dtype} on {packed.device})")
    ws = workspace if workspace is not None else MoEWorkspace.allocate(max(1, N), packed,
                                                                       x.device)
    _check_ws(ws, packed, N)
    if out is None:
        out = ws.out[:N]
    elif out.shape != (N, D) or out.dtype != x.dtype or out.stride(-1) != 1:
        raise ValueError(f"out must be ({N}, {D}) {x.dtype} with unit last stride")
    if N == 0:
        return out
    cfg = ws.config or get_config(N, packed, x.dtype, x.device, tuned=ws.tuned)
    if cfg.block_m not in BLOCK_M_CHOICES:
        raise ValueError(f"block_m={cfg.block_m} not in {BLOCK_M_CHOICES}")
    if ws.config is None and not interpreted():
        cfg = replace(cfg, split_shared=_shared_split(N, packed.n_shared_slots, cfg, D,
                                                      ws.y_shared.shape[0]))
    return _moe_ffn_impl(x, packed, ws, out, cfg)


# ---------------------------------------------------------------------------------------
# autotuning (GPU, compile time)
# ---------------------------------------------------------------------------------------

def smem_bytes(cfg: MoEConfig, elt: int) -> int:
    """Pipelined shared memory of the largest GEMM of ``cfg`` (``elt`` bytes/element)."""
    g1 = cfg.block_m * cfg.block_k1 + 2 * cfg.block_k1 * cfg.block_n1
    g2 = max(cfg.block_m, cfg.block_m_shared) * cfg.block_k2 + cfg.block_k2 * cfg.block_n2
    return max(g1, g2) * elt * max(1, cfg.num_stages)


_SMEM_BUDGET = 200 * 1024   # H100/H200 allow 227 KiB per block; leave room for epilogues


def _candidates(n_tokens: int, packed: PackedMoE, dtype: torch.dtype) -> list:
    base = heuristic_config(n_tokens, packed.dim, packed.expert_dim, packed.n_routed,
                            packed.top_k, packed.n_shared_slots, dtype)
    out = [base]
    avg = n_tokens * packed.top_k / max(1, packed.n_routed)
    if avg <= 16:
        for bn1, bk1, bn2, bk2, st in ((32, 128, 32, 128, 4), (64, 128, 64, 128, 4),
                                       (128, 128, 32, 256, 3), (32, 256, 32, 256, 3),
                                       (64, 64, 64, 64, 5), (64, 256, 64, 256, 3)):
            out.append(replace(base, block_n1=bn1, block_k1=bk1, block_n2=bn2,
                               block_k2=bk2, num_stages=st))
    else:
        for bm in (32, 64, 128):
            for bn1, bn2, bk, w, st in ((64, 64, 64, 4, 4), (64, 128, 64, 4, 3),
                                        (128, 128, 64, 8, 3), (64, 128, 32, 4, 5)):
                out.append(MoEConfig(block_m=bm, block_n1=bn1, block_k1=bk, block_n2=bn2,
                                     block_k2=bk, block_m_shared=bm, num_warps=w,
                                     num_stages=st))
    elt = torch.empty((), dtype=dtype).element_size()
    seen, uniq = set(), []
    for c in out:
        if c not in seen and smem_bytes(c, elt) <= _SMEM_BUDGET:
            seen.add(c)
            uniq.append(c)
    return uniq


def autotune_moe(packed: PackedMoE, token_counts: Iterable[int] = (1, 16, 128, 1024, 8192),
                 workspace: Optional[MoEWorkspace] = None,
                 candidates: Optional[Sequence[MoEConfig]] = None, force: bool = False,
                 path: Optional[str] = None, reps: int = 20) -> Dict[int, MoEConfig]:
    """Time candidate configs per token bucket on the GPU; persist the best to the cache.

    Buckets already in the cache are skipped (unless ``force``), so a second compile does
    not re-tune. Returns {token bucket: config}. A no-op returning the fixed config
    under the interpreter / without CUDA. Not for use under CUDA-graph capture.
    """
    token_counts = sorted({token_bucket(n) for n in token_counts})
    if interpreted() or packed.device.type != "cuda":
        return {n: INTERPRETER_CONFIG for n in token_counts}
    import triton.testing  # noqa: F401 — only the tuner needs it

    path = path or cache_path()
    cache = _load_cache(path)
    ws = workspace or MoEWorkspace.allocate(max(token_counts), packed)
    result, new = {}, {}
    for n in token_counts:
        key = config_key(n, packed, packed.dtype, packed.device)
        cached = _config_from(cache[key]) if key in cache else None
        if cached is not None and not force:
            result[n] = cached
            continue
        x = torch.randn(n, packed.dim, device=packed.device, dtype=packed.dtype)
        out = torch.empty_like(x)
        best, best_ms = None, float("inf")
        for cfg in (candidates or _candidates(n, packed, packed.dtype)):
            cfg = replace(cfg, split_shared=_shared_split(n, packed.n_shared_slots, cfg,
                                                          packed.dim, ws.y_shared.shape[0]))
            try:
                ms = triton.testing.do_bench(
                    lambda: _moe_ffn_impl(x, packed, ws, out, cfg), warmup=5, rep=reps,
                    return_mode="median")
            except Exception:  # noqa: BLE001 — e.g. out of shared memory: skip candidate
                continue
            if ms < best_ms:
                best, best_ms = cfg, ms
        if best is None:
            best = get_config(n, packed, packed.dtype, packed.device, path)
        result[n] = best
        new[key] = dict(best.to_dict(), _ms=round(best_ms, 5))
    if new:
        _save_cache(path, new)
    return result

"""Lean CPU attention (MLA and GQA): one new token per row in ~20 PyTorch calls.

``prepare_mla`` / ``prepare_gqa`` fuse the projections once; ``mla_attention_cpu`` /
``gqa_attention_cpu`` take the torch implementations' arguments and cache contract
(``mythos_rt.ops.attention``) and run the decode step as:

MLA   one down-projection for [k_pe | latent | c_q]; c_q's RMSNorm weight and the softmax
      scale folded into one up-projection for [q_pe | q_latent] (``w_uk`` absorbed into it
      when that keeps the matrix small, else one batched matmul); scores
      ``q_latent·ckv + q_pe·kpe`` and values ``p·ckv`` read straight from the compact
      cache; one output projection (``w_uv`` absorbed into ``wo`` under the same rule).
GQA   one projection for [q | k | v] (scale folded into q), grouped matmuls over the cache.

One new token per row of MLA over the joint cache (decode) is a single
``mla_decode_rows`` call of the compiled kernels (``mythos_rt.cpu.native``) where they
are available, else (one row) the PyTorch one-row path (``_mla_one_row``); of GQA, a
single ``gqa_decode_rows`` call (each cached key read once for its group of query
heads), else the grouped matmuls.

A chunk of several tokens per row (prefill) runs in latent space too (``_mla_chunk``: a
few batched matmuls, no per-head K/V over the cache). Positions are read on the host
(free on a CPU). bf16 weights: the fused matrices are kept in bf16 (folded in float64,
rounded once) and decode runs ``mla_decode_rows_bf16`` / ``gqa_decode_rows_bf16`` over
the bf16 caches (weights and cached entries widened in registers, every sum in float32,
the rows staged through float32); bf16 chunks (prefill) run the torch implementation
(oneDNN's bf16 matmuls). Other dtypes, and positions past the cache, run the torch
implementation too.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from ..ops.attention import GQAWeights, MLAWeights, gqa_attention, mla_attention
from . import native
from .memo import per_tensor
from .norm import ZERO, inv_rms, rms_normalize

__all__ = ["CpuMLA", "CpuGQA", "prepare_mla", "prepare_gqa", "mla_attention_cpu",
           "bind_mla_attention_cpu", "gqa_attention_cpu", "bind_gqa_attention_cpu"]

# Absorb w_uk / w_uv into a projection only while the fused matrix holds at most this
# many times the parameters of the two it replaces: below, one call beats two; above,
# the extra bytes read per token would cost more than the call saved.
FOLD_LIMIT = 2.0


@dataclass
class CpuMLA:
    """MLA weights fused for decode (float32, or bf16 for a bf16 model). Every matrix is
    stored contiguous in nn.Linear's (out, in) layout, which the kernel streams row by
    row; the ``*_t`` fields (and ``w_uk``) are transposed views of them, the right-hand
    sides of the PyTorch paths' matmuls."""
    base: MLAWeights            # the torch implementation's weights (prefill, other dtypes)
    down_t: torch.Tensor        # (D, rope + R + q_lora): [kv_down's rope rows; its latent
                                # rows; q_down]ᵀ
    q_up_t: torch.Tensor        # (q_lora, H·(rope + (R or nope))): per head [q_pe | q_latent],
                                # q_norm and the softmax scale folded in
    w_uk: Optional[torch.Tensor]  # (H, nope, R) when not absorbed into q_up
    o_t: torch.Tensor           # (H·R, D) = (wo∘w_uv)ᵀ, or (H·v, D) = woᵀ when not absorbed
    w_uv_t: Optional[torch.Tensor]  # (H, R, v) when not absorbed into o_t
    kv_norm: torch.Tensor       # (R,)
    scale: float                # the softmax scale folded into q_up
    n_heads: int
    rank: int
    rope: int
    eps: float
    # Decode over the joint cache: the compiled kernel (any rows, absorbed or not), else
    # the PyTorch one-row path's buffers (fully absorbed only).
    row_kernel: Optional[native.Kernel] = None
    row: Optional["_RowScratch"] = None


@dataclass
class _RowScratch:
    """Buffers and views of the one-row MLA decode, made once. One buffer holds
    [H query rows | the new entry's row | c_q], rows rope + R wide: the down-projection
    writes [entry | c_q] in one matmul and one complex multiply applies RoPE to the
    queries and the entry together."""
    q_flat: torch.Tensor        # (1, H·(rope + R)) view of the query rows (addmm's output)
    heads: torch.Tensor         # (H, rope + R) view of the query rows
    down: torch.Tensor          # (1, rope + R + q_lora) view of [entry | c_q] (one matmul)
    entry: torch.Tensor         # (rope + R,) view of the entry row [k_pe | latent]
    latent: torch.Tensor        # (1, R) view of the entry's latent
    c_q: torch.Tensor           # (1, q_lora) view
    pe: torch.Tensor            # (H + 1, rope/2) complex view of every row's rope part
    o: torch.Tensor             # (H, rope + R) attention output, and its (1, H·(rope + R)) view
    o_flat: torch.Tensor
    o_t: torch.Tensor           # (H·(rope + R), D): o_t with zero rows at the rope columns

    @classmethod
    def allocate(cls, H: int, P: int, R: int, q_lora: int, o_t: torch.Tensor) -> "_RowScratch":
        W = P + R
        flat = torch.zeros(1, (H + 1) * W + q_lora)
        rows = flat[0, :(H + 1) * W].view(H + 1, W)
        o_ext = torch.zeros(H, W, o_t.shape[1])
        o_ext[:, P:] = o_t.view(H, R, -1)
        o = torch.zeros(H, W)
        return cls(flat[:, :H * W], rows[:H], flat[:, H * W:], rows[H], rows[H:, P:],
                   flat[:, (H + 1) * W:],
                   torch.view_as_complex(rows.view(H + 1, W // 2, 2))[:, :P // 2],
                   o, o.view(1, -1), o_ext.view(H * W, -1))


@dataclass
class CpuGQA:
    """GQA weights fused for decode: [wq·scale; wk; wv]ᵀ and woᵀ (float32, or bf16 for a
    bf16 model), transposed views of contiguous nn.Linear-layout matrices (the kernel
    streams their rows)."""
    base: GQAWeights
    qkv_t: torch.Tensor         # (D, (H + 2·Hkv)·d)
    wo_t: torch.Tensor          # (H·d, D)
    scale: float
    n_heads: int
    n_kv_heads: int
    head_dim: int
    row_kernel: Optional[native.Kernel] = None  # the compiled decode, where available


def _fold(big: int, parts: int, limit: float) -> bool:
    return big <= limit * parts


def _matrix_dtype(w: torch.Tensor) -> torch.dtype:
    """The dtype the fused matrices are kept in: bf16 for bf16 weights (the bf16 kernels
    stream half the bytes), else float32."""
    return torch.bfloat16 if w.dtype == torch.bfloat16 else torch.float32


def _kernel_name(name: str, dtype: torch.dtype) -> str:
    return f"{name}_bf16" if dtype == torch.bfloat16 else name


def prepare_mla(w: MLAWeights, fold_limit: Optional[float] = None) -> CpuMLA:
    """Fuse an MLA sublayer's weights for ``mla_attention_cpu`` (folds in float64)."""
    limit = FOLD_LIMIT if fold_limit is None else fold_limit
    H, nope, R, P, v = w.n_heads, w.nope, w.kv_lora_rank, w.rope_dim, w.v_dim
    q_lora, D = w.q_down.shape
    scale = (nope + P) ** -0.5
    d = torch.float64
    col = w.q_norm.to(d)[None, :] * scale
    rope_rows = (w.q_up_rope.to(d) * col).view(H, P, q_lora)
    nope_rows = (w.q_up_nope.to(d) * col).view(H, nope, q_lora)
    fold_q = _fold(H * R * q_lora, H * nope * (q_lora + R), limit)
    if fold_q:  # q_lat[h] = w_uk[h]ᵀ q_nope[h]
        lat_rows = torch.einsum("hnr,hnq->hrq", w.w_uk.to(d), nope_rows)
    else:
        lat_rows = nope_rows
    q_up = torch.cat([rope_rows, lat_rows], 1).reshape(-1, q_lora)   # per head [pe | lat]
    fold_o = _fold(H * R * D, H * v * (D + R), limit)
    wo = w.wo.to(d).view(D, H, v)
    o_t = (torch.einsum("dhv,hvr->hrd", wo, w.w_uv.to(d)).reshape(H * R, D) if fold_o
           else wo.reshape(D, H * v).t())
    mat = dict(dtype=_matrix_dtype(w.wo))

    def rows(t: torch.Tensor) -> torch.Tensor:  # (out, in), contiguous
        return t.to(**mat).contiguous()
    down = rows(torch.cat([w.kv_down[R:], w.kv_down[:R], w.q_down]))
    w_uk = None if fold_q else rows(w.w_uk.transpose(1, 2))      # (H, R, nope)
    w_uv = None if fold_o else rows(w.w_uv)                       # (H, v, R)
    m = CpuMLA(
        base=w, down_t=down.t(), q_up_t=rows(q_up).t(),
        w_uk=None if w_uk is None else w_uk.transpose(1, 2), o_t=rows(o_t.t()).t(),
        w_uv_t=None if w_uv is None else w_uv.transpose(1, 2),
        kv_norm=w.kv_norm.float().contiguous(), scale=scale, n_heads=H, rank=R, rope=P,
        eps=w.eps)
    lib = native.library() if P % 2 == 0 else None
    bf16 = mat["dtype"] == torch.bfloat16
    if lib is not None:
        m.row_kernel = native.kernel(
            lib, _kernel_name("mla_decode_rows", mat["dtype"]), native.MlaRow,
            dict(D=D, H=H, R=R, P=P, q_lora=q_lora, nope=nope, v=v, eps=w.eps),
            dict(down=down, kv_norm=m.kv_norm, q_up=m.q_up_t.t(), w_uk=w_uk, w_uv=w_uv,
                 wo=m.o_t.t()),
            bf16=("down", "q_up", "w_uk", "w_uv", "wo") if bf16 else ())
    elif fold_q and fold_o and (P + R) % 2 == 0 and not bf16:
        m.row = _RowScratch.allocate(H, P, R, q_lora, m.o_t)
    return m


def prepare_gqa(w: GQAWeights) -> CpuGQA:
    """Fuse a GQA sublayer's weights for ``gqa_attention_cpu``."""
    scale = w.head_dim ** -0.5
    qkv = torch.cat([w.wq.double() * scale, w.wk.double(), w.wv.double()])
    dtype = _matrix_dtype(w.wo)
    qkv, wo = qkv.to(dtype).contiguous(), w.wo.to(dtype).contiguous()  # (out, in)
    g = CpuGQA(base=w, qkv_t=qkv.t(), wo_t=wo.t(), scale=scale, n_heads=w.n_heads,
               n_kv_heads=w.n_kv_heads, head_dim=w.head_dim)
    lib = native.library() if w.head_dim % 2 == 0 else None
    if lib is not None:
        g.row_kernel = native.kernel(
            lib, _kernel_name("gqa_decode_rows", dtype), native.GqaRow,
            dict(D=g.qkv_t.shape[0], H=g.n_heads, Hkv=g.n_kv_heads, d=g.head_dim),
            dict(qkv=qkv, wo=wo), bf16=("qkv", "wo") if dtype == torch.bfloat16 else ())
    return g


# ----------------------------------------------------------------------------- helpers

def _phasor_table(cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """The complex RoPE table cos + i·sin (S_max, rope/2), built once per table."""
    return per_tensor("phasors", cos, lambda c: torch.complex(c, sin))


def joint_mla_caches(cfg, batch: int, seq_len: int, dtype: torch.dtype, device) -> tuple:
    """One layer's MLA caches (ckv, kpe) as views of one zeroed buffer (B, S, rope + R),
    [k_pe | latent] per token, so that a decode step reads each cached token as one row
    (one matmul, one pass over memory). Registered as the cpu MLA's cache allocator."""
    P = cfg.qk_rope_head_dim
    joint = torch.zeros(batch, seq_len, P + cfg.kv_lora_rank, dtype=dtype, device=device)
    return joint[..., P:], joint[..., :P]


def _joint_rows(ckv: torch.Tensor, kpe: torch.Tensor):
    """Row 0 (S_max, rope + R) of a ``joint_mla_caches`` buffer (``kpe`` its first rope
    columns, ``ckv`` the rest), or None for separate buffers."""
    def make(kpe):
        P, R = kpe.shape[-1], ckv.shape[-1]
        W = P + R
        joint = (kpe.dim() == 3 and ckv.shape[:2] == kpe.shape[:2]
                 and kpe.stride() == (kpe.shape[1] * W, W, 1) and ckv.stride() == kpe.stride()
                 and kpe.storage_offset() % 2 == 0
                 and ckv.data_ptr() == kpe.data_ptr() + P * kpe.element_size())
        return kpe.as_strided((kpe.shape[1], W), (W, 1)) if joint else None
    return per_tensor("mla_rows", kpe, make)


def _tables_fit(cos, sin, S_max: int, pairs: int) -> bool:
    """Whether the RoPE tables are float32 (≥ S_max, pairs) rows a kernel can index."""
    return all(t.dtype == torch.float32 and t.dim() == 2 and t.shape[0] >= S_max
               and t.shape[1] == pairs for t in (cos, sin))


def _phasors(cos, sin, pos: list[int], cache_lens):
    """RoPE phasors of the rows' positions: (rope/2,) complex for one row, else (B, 1, rope/2)."""
    table = _phasor_table(cos, sin)
    if len(pos) == 1:
        return table[pos[0]]
    return table[cache_lens.long()][:, None, :]


def _mm_scaled(x: torch.Tensor, w_t: torch.Tensor, r) -> torch.Tensor:
    """(x @ w_t) scaled per row by r (a float or (B, 1))."""
    if isinstance(r, float):
        return torch.addmm(ZERO, x, w_t, beta=0, alpha=r)
    return torch.mm(x, w_t).mul_(r)


def _complex_view(x: torch.Tensor) -> Optional[torch.Tensor]:
    """x (..., rope) as a complex view of its adjacent pairs, or None if its layout can't."""
    pairs = x.unflatten(-1, (-1, 2))
    if pairs.storage_offset() % 2 or any(s % 2 for s in pairs.stride()[:-1]):
        return None
    return torch.view_as_complex(pairs)


def _rotate_(x: torch.Tensor, ph: torch.Tensor) -> torch.Tensor:
    """Rotate x (B, h, rope)'s adjacent pairs in place by ph (the reference's complex RoPE)."""
    c = _complex_view(x)
    if c is not None:
        c.mul_(ph)
    else:
        x.copy_(torch.view_as_real(torch.view_as_complex(
            x.unflatten(-1, (-1, 2)).contiguous()) * ph).flatten(-2))
    return x


def _store(cache: torch.Tensor, pos: list[int], cache_lens, values: torch.Tensor) -> None:
    """cache[b, pos[b]] = values[b] for the B rows (values (B, ...))."""
    if len(pos) == 1:
        cache[0, pos[0]:pos[0] + 1].copy_(values)
    else:
        B = len(pos)
        cache[torch.arange(B), cache_lens.long()] = values


def _decode_positions(x, cache_lens, S_max: int, dtype: torch.dtype) -> Optional[list[int]]:
    """Host positions of a one-token chunk in ``dtype`` (the fused matrices') that fits
    the cache, else None."""
    if x.shape[1] != 1 or x.dtype != dtype:
        return None
    pos = cache_lens.tolist()  # (B,) by contract
    return pos if max(pos) < S_max else None


def _mask_ragged_(s: torch.Tensor, pos: list[int], cache_lens) -> Optional[torch.Tensor]:
    """Rows of different lengths: scores of keys past a row's own position become -inf
    and the (B, L) mask of those keys is returned (None when every row has the same)."""
    if min(pos) == max(pos):
        return None
    B, L = len(pos), s.shape[-1]
    far = torch.arange(L) > cache_lens.long()[:, None]
    s.masked_fill_(far.view(B, *([1] * (s.dim() - 2)), L), float("-inf"))
    return far


def _zero_far(values: torch.Tensor, far: Optional[torch.Tensor]) -> torch.Tensor:
    """values (B, L, ...) with the masked keys' slots zeroed: unwritten cache slots may hold
    anything (NaN), and a zero probability times NaN is still NaN."""
    if far is None:
        return values
    return values.masked_fill(far.view(*far.shape, *([1] * (values.dim() - 2))), 0.0)


def _output(o: torch.Tensor, wo_t: torch.Tensor, out: Optional[torch.Tensor], B: int):
    D = wo_t.shape[1]
    res = torch.mm(o, wo_t) if out is None else torch.mm(o, wo_t, out=out.view(B, D))
    return res.view(B, 1, D)


# ----------------------------------------------------------------------------- sublayers

def mla_attention_cpu(x, w: CpuMLA, ckv, kpe, cache_lens, cos, sin, scale, out=None):
    """MLA attention sublayer, lean decode (same contract as ``ops.attention.mla_attention``)."""
    pos = _decode_positions(x, cache_lens, ckv.shape[1], w.o_t.dtype)
    if pos is None:
        if _latent_chunk(x, w, cache_lens, ckv.shape[1], scale):
            return _mla_chunk(x, w, ckv, kpe, cache_lens, cos, sin, out)
        return mla_attention(x, w.base, ckv, kpe, cache_lens, cos, sin, scale, out)
    if w.row_kernel is not None:
        res = native.run_bound(lambda target: bind_mla_attention_cpu(
            x, w, ckv, kpe, cache_lens, cos, sin, scale, target), x, out)
        if res is not None:
            return res
    if x.dtype != torch.float32:  # bf16 rows the kernel did not take
        return mla_attention(x, w.base, ckv, kpe, cache_lens, cos, sin, scale, out)
    rows = (_joint_rows(ckv, kpe) if len(pos) == 1 and scale == w.scale and w.row is not None
            else None)
    if rows is not None:
        return _mla_one_row(x, w, rows, pos[0], _phasor_table(cos, sin)[pos[0]], out)
    ph = _phasors(cos, sin, pos, cache_lens)
    B, H, R, P = x.shape[0], w.n_heads, w.rank, w.rope
    L = max(pos) + 1
    y = torch.mm(x.view(B, -1), w.down_t)                       # [k_pe | latent | c_q]
    kv, c_q = y[:, :P + R], y[:, P + R:]
    q = _mm_scaled(c_q, w.q_up_t, inv_rms(c_q, w.eps)).view(B, H, -1)   # per head [pe | lat]
    q_pe, q_lat = q[..., :P], q[..., P:]
    if w.w_uk is not None:
        q_lat = torch.matmul(q_lat.transpose(0, 1), w.w_uk).transpose(0, 1)
    _rotate_(q_pe, ph)
    lat = kv[:, P:]
    _store(ckv, pos, cache_lens, rms_normalize(lat, w.kv_norm, w.eps))
    _store(kpe, pos, cache_lens, _rotate_(kv[:, :P].view(B, 1, P), ph)[:, 0])
    keys, keys_pe = ckv[:B, :L], kpe[:B, :L]
    s = torch.baddbmm(torch.bmm(q_pe, keys_pe.transpose(1, 2)), q_lat, keys.transpose(1, 2))
    if scale != w.scale:
        s.mul_(scale / w.scale)
    far = _mask_ragged_(s, pos, cache_lens)
    o = torch.bmm(torch.softmax(s, -1), _zero_far(keys, far))    # (B, H, R)
    if w.w_uv_t is not None:
        o = torch.matmul(o.transpose(0, 1), w.w_uv_t).transpose(0, 1)   # (B, H, v)
    return _output(o.reshape(B, -1), w.o_t, out, B)


def _latent_chunk(x, w: CpuMLA, cache_lens, S_max: int, scale: float) -> bool:
    """Whether a chunk (T > 1) runs ``_mla_chunk``: float32, the fused weights' scale, in
    range."""
    return (x.dtype == torch.float32 and w.o_t.dtype == torch.float32 and scale == w.scale
            and int(cache_lens.max()) + x.shape[1] <= S_max)


def _mla_chunk(x, w: CpuMLA, ckv, kpe, cache_lens, cos, sin, out):
    """T tokens per row (prefill, chunked prefill) in latent space: the chunk's entries
    are written at ``cache_lens[b] + i``, then each query attends causally over its row's
    cached prefix and the chunk, scores ``q_latent·ckv + q_pe·kpe`` and values ``p·ckv``
    (no per-head K/V is formed over the cache), then the output projection. Unabsorbed
    weights map q_nope to q_latent (``w_uk``) and the latent values to v (``w_uv``) per
    head, on the chunk's T queries only."""
    B, T, D = x.shape
    H, R, P = w.n_heads, w.rank, w.rope
    lens = cache_lens.tolist()
    S = max(lens) + T
    y = torch.mm(x.reshape(B * T, D), w.down_t)                      # [k_pe | latent | c_q]
    c_q = y[:, P + R:]
    q = _mm_scaled(c_q, w.q_up_t, inv_rms(c_q, w.eps)).view(B, T, H, -1)
    if w.w_uk is not None:  # [q_pe | q_nope] -> [q_pe | q_nope · w_uk[h]]
        q_lat = torch.matmul(q[..., P:].transpose(1, 2), w.w_uk).transpose(1, 2)
        q = torch.cat([q[..., :P], q_lat], -1)
    pos = cache_lens.long()[:, None] + torch.arange(T)                # (B, T)
    ph = _phasor_table(cos, sin)[pos]                                 # (B, T, rope/2)
    _rotate_(q[..., :P], ph[:, :, None])
    k_pe = _rotate_(y[:, :P].reshape(B, T, P), ph)
    lat = rms_normalize(y[:, P:P + R], w.kv_norm, w.eps).view(B, T, R)
    for b, n in enumerate(lens):
        ckv[b, n:n + T].copy_(lat[b])
        kpe[b, n:n + T].copy_(k_pe[b])
    keys, keys_pe = ckv[:B, None, :S], kpe[:B, None, :S]                # (B, 1, S, ·)
    q = q.transpose(1, 2)                                             # (B, H, T, rope + R)
    s = torch.matmul(q[..., P:], keys.transpose(-1, -2)).add_(
        torch.matmul(q[..., :P], keys_pe.transpose(-1, -2)))          # (B, H, T, S)
    visible = torch.arange(S) <= pos[:, :, None]                      # (B, T, S)
    s.masked_fill_(~visible[:, None], float("-inf"))
    if min(lens) != max(lens):  # slots past a shorter row's chunk may hold anything
        keys = keys.masked_fill((torch.arange(S) >= (cache_lens.long() + T)[:, None])
                                .view(B, 1, S, 1), 0.0)
    o = torch.matmul(torch.softmax(s, -1), keys)                      # (B, H, T, R)
    if w.w_uv_t is not None:
        o = torch.matmul(o, w.w_uv_t)                                 # (B, H, T, v)
    o = o.transpose(1, 2).reshape(B * T, -1)
    if out is None:
        return torch.mm(o, w.o_t).view(B, T, D)
    torch.mm(o, w.o_t, out=out.view(B * T, D))
    return out


def bind_mla_attention_cpu(x, w: CpuMLA, ckv, kpe, cache_lens, cos, sin, scale, out=None):
    """``mla_attention_cpu`` for B rows of one token as a prebound call of the compiled
    kernel (it reads the positions from ``cache_lens`` itself), or None where that does
    not apply: not single tokens, rows or caches not in the fused matrices' dtype,
    separate caches, or a layout the kernel cannot take. bf16: through float32 staging
    rows (``native.bind_staged``)."""
    if w.o_t.dtype == torch.bfloat16 and w.row_kernel is not None:
        return native.bind_staged(lambda x32, out32: _bind_mla_rows(
            x32, w, ckv, kpe, cache_lens, cos, sin, scale, out32), x, out)
    return _bind_mla_rows(x, w, ckv, kpe, cache_lens, cos, sin, scale, out)


def _bind_mla_rows(x, w: CpuMLA, ckv, kpe, cache_lens, cos, sin, scale, out):
    """The prebound kernel call of ``bind_mla_attention_cpu`` on float32 rows."""
    k = w.row_kernel
    B = x.shape[0]
    if (k is None or x.dim() != 3 or x.shape[1] != 1 or x.dtype != torch.float32
            or kpe.dtype != w.o_t.dtype
            or out is None or scale != w.scale or cache_lens.dtype != torch.int32
            or cache_lens.shape != (B,) or B > kpe.shape[0]
            or not _tables_fit(cos, sin, kpe.shape[1], w.rope // 2)
            or not native.contiguous(x, out, cache_lens, cos, sin)):
        return None
    rows = _joint_rows(ckv, kpe)
    if rows is None:
        return None
    S_max = rows.shape[0]
    call = native.prebound(k.fn, k.ref, x.data_ptr(), rows.data_ptr(), kpe.stride(0),
                           cache_lens.data_ptr(), B, S_max, cos.data_ptr(), sin.data_ptr(),
                           out.data_ptr(), keep=(x, rows, cache_lens, cos, sin, out))

    return native.in_cache_launch(call, "mla_attention", cache_lens, S_max, out)


def _mla_one_row(x, w: CpuMLA, rows: torch.Tensor, p: int, ph, out):
    """One row over the joint cache rows (S_max, rope + R) = [k_pe | latent]: queries and
    the new entry are projected into ``w.row``'s buffer, rotated by one complex multiply,
    the entry is copied into its slot, and the scores of [q_pe | q_latent] against
    [k_pe | latent] are a single matmul (values too: o_t is zero at the rope columns)."""
    buf = w.row
    torch.mm(per_tensor("rows2d", x, lambda t: t.view(1, -1)), w.down_t, out=buf.down)
    rms_normalize(buf.latent, w.kv_norm, w.eps, out=buf.latent)
    torch.addmm(ZERO, buf.c_q, w.q_up_t, beta=0, alpha=inv_rms(buf.c_q, w.eps), out=buf.q_flat)
    buf.pe.mul_(ph)
    rows[p] = buf.entry
    keys = rows[:p + 1]
    torch.mm(torch.softmax(torch.mm(buf.heads, keys.t()), -1), keys, out=buf.o)
    if out is None:
        return torch.mm(buf.o_flat, buf.o_t).view(1, 1, -1)
    torch.mm(buf.o_flat, buf.o_t, out=per_tensor("rows2d", out, lambda t: t.view(1, -1)))
    return out


def gqa_attention_cpu(x, w: CpuGQA, k_cache, v_cache, cache_lens, cos, sin, scale, out=None):
    """GQA attention sublayer, lean decode (same contract as ``ops.attention.gqa_attention``)."""
    pos = _decode_positions(x, cache_lens, k_cache.shape[1], w.qkv_t.dtype)
    if pos is None:
        return gqa_attention(x, w.base, k_cache, v_cache, cache_lens, cos, sin, scale, out)
    if w.row_kernel is not None:
        res = native.run_bound(lambda target: bind_gqa_attention_cpu(
            x, w, k_cache, v_cache, cache_lens, cos, sin, scale, target), x, out)
        if res is not None:
            return res
    if x.dtype != torch.float32:  # bf16 rows the kernel did not take
        return gqa_attention(x, w.base, k_cache, v_cache, cache_lens, cos, sin, scale, out)
    B, H, Hkv, d = x.shape[0], w.n_heads, w.n_kv_heads, w.head_dim
    L = max(pos) + 1
    y = torch.mm(x.view(B, -1), w.qkv_t)
    q = y[:, :H * d].view(B, H, d)
    ph = _phasors(cos, sin, pos, cache_lens)
    _rotate_(q, ph)
    _store(k_cache, pos, cache_lens, _rotate_(y[:, H * d:(H + Hkv) * d].view(B, Hkv, d), ph))
    _store(v_cache, pos, cache_lens, y[:, (H + Hkv) * d:].view(B, Hkv, d))
    keys, values = k_cache[:B, :L], v_cache[:B, :L]              # (B, L, Hkv, d)
    s = torch.matmul(q.view(B, Hkv, H // Hkv, d), keys.permute(0, 2, 3, 1))  # (B, Hkv, g, L)
    if scale != w.scale:
        s.mul_(scale / w.scale)
    far = _mask_ragged_(s, pos, cache_lens)
    o = torch.matmul(torch.softmax(s, -1), _zero_far(values, far).transpose(1, 2))  # (B, Hkv, g, d)
    return _output(o.reshape(B, H * d), w.wo_t, out, B)


def bind_gqa_attention_cpu(x, w: CpuGQA, k_cache, v_cache, cache_lens, cos, sin, scale,
                           out=None):
    """``gqa_attention_cpu`` for B rows of one token as a prebound call of the compiled
    kernel (it reads the positions from ``cache_lens`` itself), or None where that does
    not apply: not single tokens, rows or caches not in the fused matrices' dtype, or
    caches or tables the kernel cannot take. bf16: through float32 staging rows
    (``native.bind_staged``)."""
    if w.qkv_t.dtype == torch.bfloat16 and w.row_kernel is not None:
        return native.bind_staged(lambda x32, out32: _bind_gqa_rows(
            x32, w, k_cache, v_cache, cache_lens, cos, sin, scale, out32), x, out)
    return _bind_gqa_rows(x, w, k_cache, v_cache, cache_lens, cos, sin, scale, out)


def _bind_gqa_rows(x, w: CpuGQA, k_cache, v_cache, cache_lens, cos, sin, scale, out):
    """The prebound kernel call of ``bind_gqa_attention_cpu`` on float32 rows."""
    k = w.row_kernel
    B = x.shape[0]
    if (k is None or x.dim() != 3 or x.shape[1] != 1 or x.dtype != torch.float32
            or out is None or scale != w.scale or cache_lens.dtype != torch.int32
            or cache_lens.shape != (B,) or k_cache.dtype != w.qkv_t.dtype
            or k_cache.shape != v_cache.shape or k_cache.stride() != v_cache.stride()
            or k_cache.shape[2:] != (w.n_kv_heads, w.head_dim) or B > k_cache.shape[0]
            or not _tables_fit(cos, sin, k_cache.shape[1], w.head_dim // 2)
            or not native.contiguous(x, out, cache_lens, cos, sin, k_cache, v_cache)):
        return None
    S_max = k_cache.shape[1]
    call = native.prebound(k.fn, k.ref, x.data_ptr(), k_cache.data_ptr(), v_cache.data_ptr(),
                           k_cache.stride(0), cache_lens.data_ptr(), B, S_max, cos.data_ptr(),
                           sin.data_ptr(), out.data_ptr(),
                           keep=(x, k_cache, v_cache, cache_lens, cos, sin, out))

    return native.in_cache_launch(call, "gqa_attention", cache_lens, S_max, out)

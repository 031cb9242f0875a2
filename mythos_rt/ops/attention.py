"""Attention op family: MLA (absorbed decode + flash prefill) and GQA, torch implementations.

These composite-PyTorch functions are the per-op references of the Triton kernels in
``mythos_rt.triton_kernels`` (identically-signed ``*_triton`` versions) and run anywhere.

Cache contract (see docs/attention.md)
--------------------------------------
Caches are preallocated per (prelude layer | loop index | coda layer), never reallocated:

* MLA: ``ckv (B_max, S_max, R)`` holds the kv_norm-ed latent, ``kpe (B_max, S_max, rope)``
  the roped shared key (one per token, not per head).
* GQA: ``k_cache, v_cache (B_max, S_max, Hkv, head_dim)``, K stored after RoPE.
* ``cache_lens (B,) int32``: tokens already cached per row BEFORE this chunk. New token
  ``i`` of row ``b`` sits at position ``cache_lens[b] + i`` and sees keys
  ``0 .. cache_lens[b] + i``. Ops write their new entries there (never past ``S_max``)
  and never increment ``cache_lens``.
* RoPE tables ``cos, sin (S_max, rope_dim/2)`` float32 (adjacent-pair convention).

The torch sublayers synchronize with the host on the cache write (boolean indexing) and,
for prefill, to size the key range; they are references, not graph-capturable. The
Triton versions are capturable on the decode path.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Mapping

import torch

from ..reference import precompute_rope_freqs
from .norm import NORM_EPS
from .registry import CPU_DTYPES, register

__all__ = [
    "MLAWeights", "GQAWeights", "absorb_mla_weights", "rope_tables", "rope", "rope_cache_write",
    "mla_cache_write", "mla_decode", "gqa_decode", "flash_attention", "mla_attention",
    "gqa_attention", "new_caches",
]


# ----------------------------------------------------------------------------- weights

def absorb_mla_weights(kv_up_weight: torch.Tensor, n_heads: int, nope: int, v_dim: int):
    """Split kv_up's weight per head into the absorption matrices.

    Parameters
    ----------
    kv_up_weight : (H * (nope + v_dim), R) — ``MLAttention.kv_up.weight``.

    Returns
    -------
    w_uk : (H, nope, R) with ``k_nope[h] = w_uk[h] @ c_kv``.
    w_uv : (H, v_dim, R) with ``v[h] = w_uv[h] @ c_kv``.
    Both are contiguous copies in kv_up's dtype.
    """
    R = kv_up_weight.shape[1]
    if kv_up_weight.shape[0] != n_heads * (nope + v_dim):
        raise ValueError(f"kv_up weight has {kv_up_weight.shape[0]} rows, expected "
                         f"n_heads*(nope+v_dim) = {n_heads * (nope + v_dim)}")
    w = kv_up_weight.view(n_heads, nope + v_dim, R)
    return w[:, :nope].contiguous(), w[:, nope:].contiguous()


@dataclass
class MLAWeights:
    """Weights of one MLA sublayer (nn.Linear layout: (out, in)) plus the absorbed ones."""
    q_down: torch.Tensor      # (q_lora, D)
    q_norm: torch.Tensor      # (q_lora,)
    q_up_nope: torch.Tensor   # (H*nope, q_lora)
    q_up_rope: torch.Tensor   # (H*rope, q_lora)
    kv_down: torch.Tensor     # (R + rope, D)
    kv_norm: torch.Tensor     # (R,)
    kv_up: torch.Tensor       # (H*(nope+v), R)
    wo: torch.Tensor          # (D, H*v)
    w_uk: torch.Tensor        # (H, nope, R)
    w_uv: torch.Tensor        # (H, v, R)
    eps: float = NORM_EPS

    @property
    def n_heads(self) -> int:
        return self.w_uk.shape[0]

    @property
    def nope(self) -> int:
        return self.w_uk.shape[1]

    @property
    def kv_lora_rank(self) -> int:
        return self.w_uk.shape[2]

    @property
    def v_dim(self) -> int:
        return self.w_uv.shape[1]

    @property
    def rope_dim(self) -> int:
        return self.q_up_rope.shape[0] // self.n_heads

    @classmethod
    def build(cls, w: Mapping[str, torch.Tensor], cfg) -> "MLAWeights":
        """The one builder (``lower`` and ``lower.op_args``): ``w`` maps the IR op's weight
        roles (this class's tensor fields, ``w_uk``/``w_uv`` from ``absorb_mla_weights``)
        to tensors."""
        return cls(**{f.name: w[f.name] for f in fields(cls) if f.name != "eps"})


@dataclass
class GQAWeights:
    """Weights of one GQA sublayer (nn.Linear layout: (out, in))."""
    wq: torch.Tensor  # (H*d, D)
    wk: torch.Tensor  # (Hkv*d, D)
    wv: torch.Tensor  # (Hkv*d, D)
    wo: torch.Tensor  # (D, H*d)
    n_heads: int = 0
    n_kv_heads: int = 0

    @property
    def head_dim(self) -> int:
        return self.wq.shape[0] // self.n_heads

    @classmethod
    def build(cls, w: Mapping[str, torch.Tensor], cfg) -> "GQAWeights":
        """The one builder (``lower`` and ``lower.op_args``): ``w`` maps the IR op's weight
        roles wq, wk, wv, wo to tensors; the head counts come from ``cfg``."""
        return cls(wq=w["wq"], wk=w["wk"], wv=w["wv"], wo=w["wo"], n_heads=cfg.n_heads,
                   n_kv_heads=cfg.n_kv_heads)


def rope_tables(dim: int, max_len: int, theta: float, device=None):
    """float32 ``(cos, sin)``, each (max_len, dim/2), from the reference's RoPE phasors."""
    f = precompute_rope_freqs(dim, max_len, theta)
    return f.real.contiguous().to(device), f.imag.contiguous().to(device)


# ----------------------------------------------------------------------------- helpers

def _rmsnorm(x, w, eps):
    """The reference RMSNorm, in x's dtype."""
    return x * x.pow(2).mean(-1, keepdim=True).add(eps).rsqrt() * w


def _positions(cache_lens: torch.Tensor, T: int) -> torch.Tensor:
    """(B, T) int64 absolute positions cache_lens[b] + i."""
    return cache_lens.long()[:, None] + torch.arange(T, device=cache_lens.device)


def _rotate(x, cos, sin, pos):
    """Rotate adjacent pairs of x (B, T, H, d) by the table rows at pos (B, T), in float32."""
    S_max = cos.shape[0]
    p = pos.clamp(max=S_max - 1)
    c, s = cos[p][:, :, None, :], sin[p][:, :, None, :]  # (B, T, 1, d/2)
    xf = x.float().reshape(*x.shape[:-1], -1, 2)
    xe, xo = xf[..., 0], xf[..., 1]
    out = torch.stack([xe * c - xo * s, xe * s + xo * c], dim=-1)
    return out.flatten(-2).to(x.dtype)


def _scatter_rows(cache, values, pos):
    """cache[b, pos[b, i]] = values[b, i] where pos < S_max (host-synchronizing)."""
    B = values.shape[0]
    valid = pos < cache.shape[1]
    b_idx = torch.arange(B, device=pos.device)[:, None].expand_as(pos)
    cache[b_idx[valid], pos[valid]] = values[valid].to(cache.dtype)


# ----------------------------------------------------------------------------- RoPE / cache writes

def rope(x, cos, sin, cache_lens, out=None):
    """RoPE at positions ``cache_lens[b] + i``.

    x (B, T, H, d) -> (B, T, H, d) in x's dtype (rotation in float32).
    """
    r = _rotate(x, cos, sin, _positions(cache_lens, x.shape[1]))
    if out is None:
        return r
    out.copy_(r)
    return out


def rope_cache_write(k, cos, sin, cache_lens, k_cache, v=None, v_cache=None):
    """Rotate k (B, T, Hkv, d) and store it into k_cache (B_max, S_max, Hkv, d) at
    positions ``cache_lens[b] + i`` (skipping positions >= S_max); copy v likewise."""
    pos = _positions(cache_lens, k.shape[1])
    _scatter_rows(k_cache, _rotate(k, cos, sin, pos), pos)
    if v is not None:
        _scatter_rows(v_cache, v, pos)


def mla_cache_write(kv_raw, kv_norm_w, eps, cos, sin, cache_lens, ckv, kpe):
    """Split ``kv_raw = kv_down(x)`` (B, T, R + rope) into the kv_norm-ed latent (-> ckv)
    and the roped shared key (-> kpe), written at positions ``cache_lens[b] + i``."""
    R = ckv.shape[-1]
    pos = _positions(cache_lens, kv_raw.shape[1])
    _scatter_rows(ckv, _rmsnorm(kv_raw[..., :R], kv_norm_w, eps), pos)
    _scatter_rows(kpe, _rotate(kv_raw[..., R:].unsqueeze(2), cos, sin, pos)[:, :, 0], pos)


# ----------------------------------------------------------------------------- kernel-level refs

def mla_decode(q_lat, q_pe, ckv, kpe, kv_lens, scale, num_splits=None, out=None):
    """Absorbed MLA decode attention in latent space.

    Parameters
    ----------
    q_lat : (B, H, R) query absorbed through w_uk.
    q_pe : (B, H, rope) roped query.
    ckv, kpe : (B_max, S_max, R), (B_max, S_max, rope) caches.
    kv_lens : (B,) int32, keys per row INCLUDING the new token.
    num_splits : ignored here (the Triton version splits the key range).

    Returns
    -------
    o_lat : (B, H, R) in q_lat's dtype, ``softmax(scale·(q_lat·ckv + q_pe·kpe)) @ ckv``.
    """
    B = q_lat.shape[0]
    keep = torch.arange(ckv.shape[1], device=ckv.device)[None, :] < kv_lens[:, None]
    # Unwritten slots may hold anything (NaN): zero them so 0-probability * NaN can't leak.
    c = ckv[:B].float().masked_fill(~keep[..., None], 0.0)
    p = kpe[:B].float().masked_fill(~keep[..., None], 0.0)
    s = (torch.einsum("bhr,bsr->bhs", q_lat.float(), c)
         + torch.einsum("bhp,bsp->bhs", q_pe.float(), p)) * scale
    s = s.masked_fill(~keep[:, None, :], float("-inf"))
    o = torch.einsum("bhs,bsr->bhr", torch.softmax(s, -1).nan_to_num(0.0), c).to(q_lat.dtype)
    if out is None:
        return o
    out.copy_(o)
    return out


def gqa_decode(q, k_cache, v_cache, kv_lens, scale, num_splits=None, out=None):
    """GQA decode attention over the cache.

    q (B, H, d); k_cache, v_cache (B_max, S_max, Hkv, d); kv_lens (B,) int32 INCLUDING the
    new token. Returns (B, H, d) in q's dtype. ``num_splits`` is ignored here.
    """
    B, H, _ = q.shape
    g = H // k_cache.shape[2]
    keep = torch.arange(k_cache.shape[1], device=q.device)[None, :] < kv_lens[:, None]
    k = k_cache[:B].float().masked_fill(~keep[..., None, None], 0.0).repeat_interleave(g, 2)
    v = v_cache[:B].float().masked_fill(~keep[..., None, None], 0.0).repeat_interleave(g, 2)
    s = torch.einsum("bhd,bshd->bhs", q.float(), k) * scale
    s = s.masked_fill(~keep[:, None, :], float("-inf"))
    o = torch.einsum("bhs,bshd->bhd", torch.softmax(s, -1).nan_to_num(0.0), v).to(q.dtype)
    if out is None:
        return o
    out.copy_(o)
    return out


def flash_attention(q, k, v, q_start, kv_len, scale, causal=True, out=None, num_splits=None):
    """Attention of a chunk of queries over a key range (prefill / chunked prefill).

    Parameters
    ----------
    q : (B, T, H, dqk); query ``i`` of row ``b`` sits at position ``q_start[b] + i``.
    k : (B, S, Hk, dqk); v : (B, S, Hk, dv); H % Hk == 0 (query head h uses kv head
        h // (H/Hk)).
    q_start, kv_len : (B,) int32; row b attends keys ``j < kv_len[b]`` and, when causal,
        ``j <= q_start[b] + i``.
    num_splits : ignored here (the Triton version may split the key range).

    Returns
    -------
    (B, T, H, dv) in q's dtype; a query that sees no key gets zeros.
    """
    B, T, H, _ = q.shape
    S, Hk = k.shape[1], k.shape[2]
    g = H // Hk
    j = torch.arange(S, device=q.device)
    valid = (j[None, :] < kv_len.long()[:, None])[..., None, None]  # (B, S, 1, 1)
    kk = k.float().masked_fill(~valid, 0.0).repeat_interleave(g, 2)
    vv = v.float().masked_fill(~valid, 0.0).repeat_interleave(g, 2)
    s = torch.einsum("bthd,bshd->bhts", q.float(), kk) * scale
    keep = (j[None, None, :] < kv_len.long()[:, None, None]).expand(B, T, S)
    if causal:
        keep = keep & (j[None, None, :] <= _positions(q_start, T)[:, :, None])
    s = s.masked_fill(~keep[:, None], float("-inf"))
    o = torch.einsum("bhts,bshd->bthd", torch.softmax(s, -1).nan_to_num(0.0), vv).to(q.dtype)
    if out is None:
        return o
    out.copy_(o)
    return out


# ----------------------------------------------------------------------------- sublayers

def _finish(o, wo, out):
    """Output projection o (B, T, H*v) @ wo^T into out (or a new tensor)."""
    if out is None:
        return o @ wo.t()
    torch.matmul(o, wo.t(), out=out)
    return out


def mla_query(x, w: MLAWeights):
    """(q_nope (B, T, H, nope), q_pe_raw (B, T, H, rope)) before RoPE."""
    B, T, _ = x.shape
    c_q = _rmsnorm(x @ w.q_down.t(), w.q_norm, w.eps)
    return ((c_q @ w.q_up_nope.t()).view(B, T, w.n_heads, w.nope),
            (c_q @ w.q_up_rope.t()).view(B, T, w.n_heads, w.rope_dim))


def key_extent(cache_lens: torch.Tensor, T: int, S_max: int) -> int:
    """Cache positions a chunk's attention spans: the longest row's prefix + T, read on
    the host; while a CUDA graph is being captured (a device-resident lazy-depth pass,
    ``mythos_rt.depth``) the whole cache instead, since a capture cannot read the device
    (each row still stops at its own ``kv_len``)."""
    if cache_lens.is_cuda and torch.cuda.is_current_stream_capturing():
        return S_max
    return min(int(cache_lens.max()) + T, S_max)


def mla_sublayer(x, w: MLAWeights, ckv, kpe, cache_lens, cos, sin, scale, out,
                 kernels) -> torch.Tensor:
    """The MLA sublayer's composition, shared by the torch and Triton backends.

    ``kernels`` = (rope, mla_cache_write, mla_decode, mla_prefill) of one backend, where
    ``mla_prefill(q_nope, q_pe, ckv, kpe, cache_lens, w, scale)`` is causal attention of
    the chunk over prefix + chunk, (B, T, H, v_dim).
    """
    rope_fn, cache_write_fn, decode_fn, prefill_fn = kernels
    B, T, _ = x.shape
    H = w.n_heads
    q_nope, q_pe = mla_query(x, w)
    q_pe = rope_fn(q_pe, cos, sin, cache_lens)
    cache_write_fn(x @ w.kv_down.t(), w.kv_norm, w.eps, cos, sin, cache_lens, ckv, kpe)
    if T == 1:
        # (H, B, nope) @ (H, nope, R) -> (H, B, R), viewed as (B, H, R) without a copy.
        q_lat = torch.bmm(q_nope[:, 0].transpose(0, 1), w.w_uk).transpose(0, 1)
        kv_lens = (cache_lens + 1).clamp(max=ckv.shape[1]).to(torch.int32)
        o_lat = decode_fn(q_lat, q_pe[:, 0], ckv, kpe, kv_lens, scale)
        o = torch.bmm(o_lat.transpose(0, 1), w.w_uv.transpose(1, 2))  # (H, B, v)
        return _finish(o.transpose(0, 1).reshape(B, 1, H * w.v_dim), w.wo, out)
    o = prefill_fn(q_nope, q_pe, ckv, kpe, cache_lens, w, scale)
    return _finish(o.reshape(B, T, H * w.v_dim), w.wo, out)


def mla_prefill(q_nope, q_pe, ckv, kpe, cache_lens, w: MLAWeights, scale):
    """Causal attention of a chunk (B, T, H, ·) over the cached prefix + chunk: per-head
    K/V expanded from the latent cache through kv_up. Returns (B, T, H, v_dim)."""
    B, T, H, nope = q_nope.shape
    S = key_extent(cache_lens, T, ckv.shape[1])
    kv = (ckv[:B, :S] @ w.kv_up.t()).view(B, S, H, nope + w.v_dim)
    k = torch.cat([kv[..., :nope], kpe[:B, :S, None, :].expand(B, S, H, w.rope_dim)], -1)
    kv_len = (cache_lens + T).clamp(max=S).to(torch.int32)
    return flash_attention(torch.cat([q_nope, q_pe], -1), k, kv[..., nope:], cache_lens,
                           kv_len, scale, causal=True)


def mla_attention(x, w: MLAWeights, ckv, kpe, cache_lens, cos, sin, scale, out=None):
    """The MLA attention sublayer: normed input x (B, T, D) -> wo(attention) (B, T, D).

    Writes the chunk's kv_norm-ed latent into ``ckv`` and its roped key into ``kpe`` at
    positions ``cache_lens[b] + i`` (see module docstring). T == 1 runs the absorbed
    decode (scores and output in latent space, per-head K/V never formed); T > 1 expands
    per-head K/V from the cache (prefix + chunk) and runs causal attention.
    """
    return mla_sublayer(x, w, ckv, kpe, cache_lens, cos, sin, scale, out,
                        (rope, mla_cache_write, mla_decode, mla_prefill))


def gqa_sublayer(x, w: GQAWeights, k_cache, v_cache, cache_lens, cos, sin, scale, out,
                 kernels) -> torch.Tensor:
    """The GQA sublayer's composition, shared by the torch and Triton backends.

    ``kernels`` = (rope, rope_cache_write, gqa_decode, flash_attention) of one backend.
    """
    rope_fn, cache_write_fn, decode_fn, flash_fn = kernels
    B, T, _ = x.shape
    H, Hkv, d = w.n_heads, w.n_kv_heads, w.head_dim
    q = rope_fn((x @ w.wq.t()).view(B, T, H, d), cos, sin, cache_lens)
    cache_write_fn((x @ w.wk.t()).view(B, T, Hkv, d), cos, sin, cache_lens, k_cache,
                   (x @ w.wv.t()).view(B, T, Hkv, d), v_cache)
    S_max = k_cache.shape[1]
    if T == 1:
        kv_lens = (cache_lens + 1).clamp(max=S_max).to(torch.int32)
        o = decode_fn(q[:, 0], k_cache, v_cache, kv_lens, scale)
        return _finish(o.reshape(B, 1, H * d), w.wo, out)
    S = key_extent(cache_lens, T, S_max)
    kv_len = (cache_lens + T).clamp(max=S).to(torch.int32)
    o = flash_fn(q, k_cache[:B, :S], v_cache[:B, :S], cache_lens, kv_len, scale)
    return _finish(o.reshape(B, T, H * d), w.wo, out)


def gqa_attention(x, w: GQAWeights, k_cache, v_cache, cache_lens, cos, sin, scale, out=None):
    """The GQA attention sublayer: normed input x (B, T, D) -> wo(attention) (B, T, D).

    Writes roped K and V into the caches at positions ``cache_lens[b] + i``. T == 1 runs
    decode attention over the cache, T > 1 causal attention over prefix + chunk.
    """
    return gqa_sublayer(x, w, k_cache, v_cache, cache_lens, cos, sin, scale, out,
                        (rope, rope_cache_write, gqa_decode, flash_attention))


def new_caches(cfg, batch: int, seq_len: int, dtype: torch.dtype, device) -> tuple:
    """One layer's zeroed KV caches in the contract's layout: MLA (ckv, kpe), GQA (k, v).

    An implementation that reads its caches in another memory layout registers its own
    allocator (``register(..., caches=)``) returning views of the same shapes."""
    B, S = batch, seq_len
    if cfg.attn_type == "mla":
        return (torch.zeros(B, S, cfg.kv_lora_rank, dtype=dtype, device=device),
                torch.zeros(B, S, cfg.qk_rope_head_dim, dtype=dtype, device=device))
    shape = (B, S, cfg.n_kv_heads, cfg.head_dim)
    return (torch.zeros(shape, dtype=dtype, device=device),
            torch.zeros(shape, dtype=dtype, device=device))


# ----------------------------------------------------------------------------- registry

_T = "mythos_rt.triton_kernels"
for _op, _torch, _triton in [
    ("mla_attention", "mla_attention", f"{_T}.attention:mla_attention"),
    ("gqa_attention", "gqa_attention", f"{_T}.attention:gqa_attention"),
    ("mla_decode", "mla_decode", f"{_T}.mla_decode:mla_decode"),
    ("gqa_decode", "gqa_decode", f"{_T}.gqa_decode:gqa_decode"),
    ("flash_attention", "flash_attention", f"{_T}.flash_attention:flash_attention"),
    ("rope", "rope", f"{_T}.rope:rope"),
    ("rope_cache_write", "rope_cache_write", f"{_T}.rope:rope_cache_write"),
    ("mla_cache_write", "mla_cache_write", f"{_T}.rope:mla_cache_write"),
]:
    register(_op, "torch", f"mythos_rt.ops.attention:{_torch}")
    register(_op, "triton", _triton)
register("mla_attention", "cpu", "mythos_rt.cpu.attention:mla_attention_cpu",
         prepare="mythos_rt.cpu.attention:prepare_mla",
         bind="mythos_rt.cpu.attention:bind_mla_attention_cpu",
         caches="mythos_rt.cpu.attention:joint_mla_caches", dtypes=CPU_DTYPES)
register("gqa_attention", "cpu", "mythos_rt.cpu.attention:gqa_attention_cpu",
         prepare="mythos_rt.cpu.attention:prepare_gqa",
         bind="mythos_rt.cpu.attention:bind_gqa_attention_cpu", dtypes=CPU_DTYPES)

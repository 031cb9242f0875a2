"""RoPE (adjacent-pair convention, float32 rotation) fused with the KV-cache writes.

* ``rope``: rotate a (B, T, H, d) tensor at positions ``cache_lens[b] + i``.
* ``rope_cache_write``: rotate K and store it (and V, unrotated) into the GQA caches.
* ``mla_cache_write``: from ``kv_down(x)``: kv_norm the latent -> ckv, rotate the shared
  rope key -> kpe, one pass.

One program per (row, token). Positions come from the device tensor ``cache_lens``;
writes at positions >= S_max are dropped. Nothing allocates or synchronizes.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _rope_store_kernel(
    SRC, DST, COS, SIN, LENS, T, NH, HALF, S_TAB, S_DST,
    ss_b, ss_t, ss_h, sd_b, sd_t, sd_h,
    BLOCK_H: tl.constexpr, BLOCK_HALF: tl.constexpr, ROTATE: tl.constexpr,
    TO_CACHE: tl.constexpr,
):
    b = (tl.program_id(0) // T).to(tl.int64)
    t = (tl.program_id(0) % T).to(tl.int64)
    pos = tl.load(LENS + b).to(tl.int64) + t
    hs = tl.arange(0, BLOCK_H).to(tl.int64)
    i = tl.arange(0, BLOCK_HALF)
    mask = (hs[:, None] < NH) & (i[None, :] < HALF)
    src = SRC + b * ss_b + t * ss_t + hs[:, None] * ss_h + 2 * i[None, :]
    xe = tl.load(src, mask=mask, other=0.0).to(tl.float32)
    xo = tl.load(src + 1, mask=mask, other=0.0).to(tl.float32)
    if ROTATE:
        p = tl.minimum(pos, S_TAB - 1)
        c = tl.load(COS + p * HALF + i, mask=i < HALF, other=0.0)[None, :]
        s = tl.load(SIN + p * HALF + i, mask=i < HALF, other=0.0)[None, :]
        ye = xe * c - xo * s
        yo = xe * s + xo * c
    else:
        ye = xe
        yo = xo
    if TO_CACHE:
        row = pos
        # A block mask & a scalar comparison is rejected by Triton 3.9's interpreter
        # ("mask has unsupported dtype"): compare a block of positions instead.
        mask = mask & (pos + 0 * hs[:, None] < S_DST)
    else:
        row = t
    dst = DST + b * sd_b + row * sd_t + hs[:, None] * sd_h + 2 * i[None, :]
    tl.store(dst, ye.to(DST.dtype.element_ty), mask=mask)
    tl.store(dst + 1, yo.to(DST.dtype.element_ty), mask=mask)


def _rope_store(src, dst, cos, sin, cache_lens, rotate, to_cache):
    B, T, NH, d = src.shape
    assert src.stride(-1) == 1 and dst.stride(-1) == 1 and d % 2 == 0
    if rotate:
        assert cos.is_contiguous() and sin.is_contiguous() and cos.shape[1] == d // 2
    _rope_store_kernel[(B * T,)](
        src, dst, cos, sin, cache_lens, T, NH, d // 2, cos.shape[0], dst.shape[1],
        src.stride(0), src.stride(1), src.stride(2), dst.stride(0), dst.stride(1),
        dst.stride(2), BLOCK_H=triton.next_power_of_2(NH),
        BLOCK_HALF=triton.next_power_of_2(d // 2), ROTATE=rotate, TO_CACHE=to_cache)


def rope(x, cos, sin, cache_lens, out=None):
    """Triton RoPE of x (B, T, H, d) at positions ``cache_lens[b] + i`` -> (B, T, H, d)."""
    if out is None:
        out = torch.empty(x.shape, device=x.device, dtype=x.dtype)
    _rope_store(x, out, cos, sin, cache_lens, True, False)
    return out


def rope_cache_write(k, cos, sin, cache_lens, k_cache, v=None, v_cache=None):
    """Rotate k (B, T, Hkv, d) into k_cache (B_max, S_max, Hkv, d) at positions
    ``cache_lens[b] + i`` (< S_max); copy v into v_cache likewise."""
    _rope_store(k, k_cache, cos, sin, cache_lens, True, True)
    if v is not None:
        _rope_store(v, v_cache, cos, sin, cache_lens, False, True)


@triton.jit
def _mla_cache_write_kernel(
    KV, W, CKV, KPE, COS, SIN, LENS, T, R, HALF, S_TAB, S_DST, eps,
    sx_b, sx_t, sc_b, sc_s, sp_b, sp_s,
    BLOCK_R: tl.constexpr, BLOCK_HALF: tl.constexpr,
):
    b = (tl.program_id(0) // T).to(tl.int64)
    t = (tl.program_id(0) % T).to(tl.int64)
    pos = tl.load(LENS + b).to(tl.int64) + t
    src = KV + b * sx_b + t * sx_t
    r = tl.arange(0, BLOCK_R)
    x = tl.load(src + r, mask=r < R, other=0.0).to(tl.float32)
    w = tl.load(W + r, mask=r < R, other=0.0).to(tl.float32)
    inv = 1.0 / tl.sqrt(tl.sum(x * x, 0) / R + eps)
    y = x * inv * w
    # masks are blocks throughout (Triton 3.9's interpreter rejects block & scalar)
    tl.store(CKV + b * sc_b + pos * sc_s + r, y.to(CKV.dtype.element_ty),
             mask=(r < R) & (pos + 0 * r < S_DST))
    i = tl.arange(0, BLOCK_HALF)
    im = i < HALF
    ok = pos + 0 * i < S_DST
    xe = tl.load(src + R + 2 * i, mask=im, other=0.0).to(tl.float32)
    xo = tl.load(src + R + 2 * i + 1, mask=im, other=0.0).to(tl.float32)
    p = tl.minimum(pos, S_TAB - 1)
    c = tl.load(COS + p * HALF + i, mask=im, other=0.0)
    s = tl.load(SIN + p * HALF + i, mask=im, other=0.0)
    dst = KPE + b * sp_b + pos * sp_s + 2 * i
    tl.store(dst, (xe * c - xo * s).to(KPE.dtype.element_ty), mask=im & ok)
    tl.store(dst + 1, (xe * s + xo * c).to(KPE.dtype.element_ty), mask=im & ok)


def mla_cache_write(kv_raw, kv_norm_w, eps, cos, sin, cache_lens, ckv, kpe):
    """Fused kv_norm + RoPE + cache write for MLA.

    kv_raw (B, T, R + rope) = kv_down(x) (last dim contiguous); kv_norm_w (R,);
    ckv (B_max, S_max, R), kpe (B_max, S_max, rope) written at ``cache_lens[b] + i``.
    The norm is computed in float32 and rounded once to the cache dtype.
    """
    B, T, _ = kv_raw.shape
    R, P = ckv.shape[-1], kpe.shape[-1]
    assert kv_raw.stride(-1) == 1 and ckv.stride(-1) == 1 and kpe.stride(-1) == 1
    assert kv_raw.shape[-1] == R + P and cos.is_contiguous() and sin.is_contiguous()
    _mla_cache_write_kernel[(B * T,)](
        kv_raw, kv_norm_w, ckv, kpe, cos, sin, cache_lens, T, R, P // 2, cos.shape[0],
        ckv.shape[1], float(eps), kv_raw.stride(0), kv_raw.stride(1), ckv.stride(0),
        ckv.stride(1), kpe.stride(0), kpe.stride(1),
        BLOCK_R=triton.next_power_of_2(R), BLOCK_HALF=triton.next_power_of_2(P // 2))

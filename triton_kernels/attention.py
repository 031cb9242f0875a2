"""Triton MLA / GQA attention sublayers (same contracts as ``mythos_rt.ops.attention``).

Projections are torch matmuls; RoPE, the cache writes and the attention math are the
kernels of this package. Decode (T == 1) launches depend only on host-side shapes
(lengths stay on the device). Prefill (T > 1) reads ``max(cache_lens)`` once on the host
to size the per-head K/V expansion.
"""

from __future__ import annotations

import torch

from ..ops.attention import GQAWeights, MLAWeights, _finish, gqa_sublayer, mla_query
from .flash_attention import _launch as _flash_launch
from .flash_attention import flash_attention
from .gqa_decode import gqa_decode
from .mla_decode import mla_decode
from .rope import mla_cache_write, rope, rope_cache_write


def mla_attention(x, w: MLAWeights, ckv, kpe, cache_lens, cos, sin, scale, out=None):
    """MLA sublayer: normed x (B, T, D) -> (B, T, D); writes ckv/kpe at cache_lens[b] + i.

    T == 1: absorbed decode (q_nope·w_uk -> latent query; split-KV over ckv/kpe; latent
    output · w_uv per head). T > 1: K_nope/V expanded from the cache prefix + chunk,
    flash attention with the shared rope key passed separately (head stride 0).
    """
    B, T, _ = x.shape
    H, nope, vd = w.n_heads, w.nope, w.v_dim
    S_max = ckv.shape[1]
    q_nope, q_pe = mla_query(x, w)
    q_pe = rope(q_pe, cos, sin, cache_lens)
    mla_cache_write(x @ w.kv_down.t(), w.kv_norm, w.eps, cos, sin, cache_lens, ckv, kpe)
    if T == 1:
        # (H, B, nope) @ (H, nope, R) -> (H, B, R), viewed as (B, H, R) without a copy.
        q_lat = torch.bmm(q_nope[:, 0].transpose(0, 1), w.w_uk).transpose(0, 1)
        kv_lens = (cache_lens + 1).clamp(max=S_max).to(torch.int32)
        o_lat = mla_decode(q_lat, q_pe[:, 0], ckv, kpe, kv_lens, scale)
        o = torch.bmm(o_lat.transpose(0, 1), w.w_uv.transpose(1, 2))  # (H, B, v)
        return _finish(o.transpose(0, 1).reshape(B, 1, H * vd), w.wo, out)
    S = min(int(cache_lens.max()) + T, S_max)  # prefill only: host sync to size the range
    kv = (ckv[:B, :S] @ w.kv_up.t()).view(B, S, H, nope + vd)
    kv_len = (cache_lens + T).clamp(max=S).to(torch.int32)
    o = torch.empty(B, T, H, vd, device=x.device, dtype=x.dtype)
    _flash_launch(q_nope, q_pe, kv[..., :nope], kpe[:B, :S].unsqueeze(2).expand(B, S, H, -1),
                  kv[..., nope:], o, cache_lens, kv_len, scale, True)
    return _finish(o.reshape(B, T, H * vd), w.wo, out)


def gqa_attention(x, w: GQAWeights, k_cache, v_cache, cache_lens, cos, sin, scale, out=None):
    """GQA sublayer: normed x (B, T, D) -> (B, T, D); writes roped K and V at
    cache_lens[b] + i. T == 1: split-KV decode; T > 1: causal flash attention."""
    return gqa_sublayer(x, w, k_cache, v_cache, cache_lens, cos, sin, scale, out,
                        (rope, rope_cache_write, gqa_decode, flash_attention))

"""Triton MLA / GQA attention sublayers (same contracts as ``mythos_rt.ops.attention``).

Projections are torch matmuls; RoPE, the cache writes and the attention math are the
kernels of this package. Decode (T == 1) launches depend only on host-side shapes
(lengths stay on the device). Prefill (T > 1) reads ``max(cache_lens)`` once on the host
to size the per-head K/V expansion.
"""

from __future__ import annotations

import torch

from ..ops.attention import GQAWeights, MLAWeights, gqa_sublayer, mla_sublayer
from .flash_attention import _launch as _flash_launch
from .flash_attention import flash_attention
from .gqa_decode import gqa_decode
from .mla_decode import mla_decode
from .rope import mla_cache_write, rope, rope_cache_write


def mla_prefill(q_nope, q_pe, ckv, kpe, cache_lens, w: MLAWeights, scale):
    """Causal attention of a chunk over prefix + chunk: K_nope/V expanded from the latent
    cache, the shared rope key passed as the flash kernel's second key part with head
    stride 0 (never copied per head). Returns (B, T, H, v_dim)."""
    B, T, H, nope = q_nope.shape
    vd = w.v_dim
    S = min(int(cache_lens.max()) + T, ckv.shape[1])  # host sync to size the range
    kv = (ckv[:B, :S] @ w.kv_up.t()).view(B, S, H, nope + vd)
    kv_len = (cache_lens + T).clamp(max=S).to(torch.int32)
    o = torch.empty(B, T, H, vd, device=q_nope.device, dtype=q_nope.dtype)
    return _flash_launch(q_nope, q_pe, kv[..., :nope],
                         kpe[:B, :S].unsqueeze(2).expand(B, S, H, -1), kv[..., nope:], o,
                         cache_lens, kv_len, scale, True)


def mla_attention(x, w: MLAWeights, ckv, kpe, cache_lens, cos, sin, scale, out=None):
    """MLA sublayer: normed x (B, T, D) -> (B, T, D); writes ckv/kpe at cache_lens[b] + i.

    The composition is ``ops.attention.mla_sublayer``'s, with this package's kernels:
    T == 1 the absorbed split-KV decode over ckv/kpe; T > 1 ``mla_prefill``.
    """
    return mla_sublayer(x, w, ckv, kpe, cache_lens, cos, sin, scale, out,
                        (rope, mla_cache_write, mla_decode, mla_prefill))


def gqa_attention(x, w: GQAWeights, k_cache, v_cache, cache_lens, cos, sin, scale, out=None):
    """GQA sublayer: normed x (B, T, D) -> (B, T, D); writes roped K and V at
    cache_lens[b] + i. T == 1: split-KV decode; T > 1: causal flash attention."""
    return gqa_sublayer(x, w, k_cache, v_cache, cache_lens, cos, sin, scale, out,
                        (rope, rope_cache_write, gqa_decode, flash_attention))

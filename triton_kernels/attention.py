"""Triton MLA / GQA attention sublayers (same contracts as ``mythos_rt.ops.attention``).

Projections are torch matmuls; RoPE, the cache writes and the attention math are the
kernels of this package. Decode (T == 1) launches depend only on host-side shapes
(lengths stay on the device). Prefill (T > 1) reads ``max(cache_lens)`` once on the host
to size the key range, except under CUDA-graph capture (``key_extent``).
"""

from __future__ import annotations

import torch

from ..ops.attention import GQAWeights, MLAWeights, gqa_sublayer, key_extent, mla_sublayer
from .flash_attention import _launch as _flash_launch
from .flash_attention import flash_attention
from .gqa_decode import gqa_decode
from .mla_decode import mla_decode
from .rope import mla_cache_write, rope, rope_cache_write


def latent_prefill_wins(T: int, rank: int, nope: int, rope_dim: int, v_dim: int) -> bool:
    """Whether a chunk of T tokens attends in latent space (fewer multiply-adds).

    Per key and head, over S keys (cached prefix + chunk):

    * latent: scores ``q_lat·c_kv + q_pe·k_pe`` and ``P·c_kv`` cost T·(2R + rope);
      absorbing q through w_uk and the output through w_uv adds T·H·R·(nope + v), no S.
    * expanded: ``kv_up`` re-expands every cached latent, R·(nope + v), then attention
      costs T·(nope + rope + v).

    S·H cancels, so the choice depends on T only: latent iff
    T·(2R + rope) <= R·(nope + v) + T·(nope + rope + v). For mythos_1b (R 256, nope = v
    = 64, rope 32) that is T <= 85, for mythos_3b (R 384, 96, 32) T <= 128: short chunks
    and continuation prefills go latent; full 256-token chunks stay expanded (per key,
    latent attention costs ~3.5× the multiply-adds of per-head attention, more than
    their share of the expansion). docs/attention.md has the table.
    """
    return T * (2 * rank + rope_dim) <= rank * (nope + v_dim) + T * (nope + rope_dim + v_dim)


def mla_prefill(q_nope, q_pe, ckv, kpe, cache_lens, w: MLAWeights, scale, latent=None):
    """Causal attention of a chunk over prefix + chunk. Returns (B, T, H, v_dim).

    ``latent`` None: the path ``latent_prefill_wins`` picks (True/False force one; tests
    and benchmarks). Latent: q_lat = q_nope·w_uk per head, one flash launch
    over [ckv | kpe] as a single KV head shared by all query heads (V = the latent
    tile itself), then v = o_lat·w_uvᵀ per head. Expanded: K_nope/V from the latent
    cache through kv_up, the shared rope key passed as the flash kernel's second key
    part with head stride 0 (never copied per head).
    """
    B, T, H, nope = q_nope.shape
    R, vd = w.kv_lora_rank, w.v_dim
    S = key_extent(cache_lens, T, ckv.shape[1])
    kv_len = (cache_lens + T).clamp(max=S).to(torch.int32)
    if latent is None:
        latent = latent_prefill_wins(T, R, nope, w.rope_dim, vd)
    if latent:
        # (H, B·T, nope) @ (H, nope, R) -> (H, B·T, R), viewed as (B, T, H, R).
        q_lat = torch.bmm(q_nope.reshape(B * T, H, nope).transpose(0, 1), w.w_uk)
        o_lat = torch.empty(H, B, T, R, device=q_nope.device, dtype=q_nope.dtype)
        c = ckv[:B, :S].unsqueeze(2)
        _flash_launch(q_lat.transpose(0, 1).view(B, T, H, R), q_pe, c,
                      kpe[:B, :S].unsqueeze(2), c, o_lat.permute(1, 2, 0, 3),
                      cache_lens, kv_len, scale, True)
        o = torch.bmm(o_lat.view(H, B * T, R), w.w_uv.transpose(1, 2))  # (H, B·T, v)
        return o.transpose(0, 1).reshape(B, T, H, vd)
    kv = (ckv[:B, :S] @ w.kv_up.t()).view(B, S, H, nope + vd)
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

"""GQA decode: split-KV attention, one program per (row, KV head, split) covering every
query head of the group, so each K/V tile is read once per group."""

from __future__ import annotations

import torch

from .split_kv import choose_num_splits, pow2, split_kv_decode


def gqa_decode(q, k_cache, v_cache, kv_lens, scale, num_splits=None, out=None,
               workspace=None):
    """Triton GQA decode (same contract as ``mythos_rt.ops.attention.gqa_decode``).

    q (B, H, d); k_cache, v_cache (B_max, S_max, Hkv, d); kv_lens (B,) int32 including the
    new token; out optional (B, H, d); workspace as in ``mla_decode``. Returns (B, H, d).
    """
    B, H, _ = q.shape
    if out is None:
        out = torch.empty(B, H, v_cache.shape[-1], device=q.device, dtype=q.dtype)
    return split_kv_decode(q, None, k_cache, None, v_cache, kv_lens, scale, out, num_splits,
                           workspace)


def default_num_splits(batch: int, n_heads: int, n_kv_heads: int, s_max: int, device) -> int:
    """The split count ``gqa_decode`` picks when none is given."""
    g = n_heads // n_kv_heads
    return choose_num_splits(batch, n_kv_heads * -(-g // min(64, pow2(g))), s_max, device)

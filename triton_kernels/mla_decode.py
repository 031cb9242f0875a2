"""Absorbed MLA decode: split-KV attention in latent space over the compact MLA cache.

Scores ``q_lat·ckv + q_pe·kpe`` and the output ``softmax·ckv`` are computed directly on
the cached latent (R) and the shared rope key, so per-head K/V are never formed and the
latent tile is read once per block of heads (all heads share it) and reused as V.
"""

from __future__ import annotations

import torch

from .split_kv import choose_num_splits, decode_workspace, pow2, split_kv_decode  # noqa: F401


def mla_decode(q_lat, q_pe, ckv, kpe, kv_lens, scale, num_splits=None, out=None,
               workspace=None):
    """Triton absorbed MLA decode (same contract as ``mythos_rt.ops.attention.mla_decode``).

    Parameters
    ----------
    q_lat : (B, H, R), q_pe : (B, H, rope) — last dim contiguous, any row/head strides.
    ckv : (B_max, S_max, R), kpe : (B_max, S_max, rope) caches, same dtype as q_lat.
    kv_lens : (B,) int32 device tensor, keys per row including the new token.
    num_splits : split count; None picks it from S_max and the SM count (host values
        only). Pass it explicitly (and ``workspace``) when capturing a graph.
    out : optional (B, H, R) result buffer (q_lat's dtype).
    workspace : optional ``decode_workspace(B, H, R, num_splits, device)`` (float32).

    Returns
    -------
    o_lat : (B, H, R).
    """
    B, H, R = q_lat.shape
    if out is None:
        out = torch.empty(B, H, R, device=q_lat.device, dtype=q_lat.dtype)
    k1 = ckv.unsqueeze(2)  # (B_max, S_max, 1, R): one shared KV "head"
    k2 = kpe.unsqueeze(2)
    return split_kv_decode(q_lat, q_pe, k1, k2, k1, kv_lens, scale, out, num_splits,
                           workspace)


def default_num_splits(batch: int, n_heads: int, s_max: int, device) -> int:
    """The split count ``mla_decode`` picks when none is given."""
    return choose_num_splits(batch, -(-n_heads // min(64, pow2(n_heads))), s_max, device)

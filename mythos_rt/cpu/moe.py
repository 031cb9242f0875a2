"""Lean CPU MoE FFN for one token: host-side routing, one matmul per selected expert.

``prepare_moe`` keeps per-expert (transposed) weight views in Python lists, so picking
an expert costs no PyTorch call, and runs the shared slots as one dense projection whose rows
join the routed ones in a single SwiGLU pass. ``moe_ffn_cpu`` selects the token's k
experts on ``logits + bias`` (one addmm, one ``topk``), reads them and their logits on the host (free on a CPU), renormalizes the
chosen softmax scores there (the full softmax's denominator cancels), and accumulates
``w_j · down_j(silu(gate_j x) · up_j x)`` onto the shared experts' output with one
``addmv_`` each; no weight is copied, and the activations live in preallocated rows
whose views are made once. Batches of more than one token and dtypes other
than float32 run the torch implementation (``mythos_rt.ops.moe.moe_ffn_torch``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F

from ..ops.moe import PackedMoE, moe_ffn_torch
from .memo import per_tensor

__all__ = ["CpuMoE", "prepare_moe", "moe_ffn_cpu"]


@dataclass
class CpuMoE:
    """One MoE FFN laid out for single-token decode, with its scratch rows."""
    base: PackedMoE
    router_t: torch.Tensor             # (D, E) view
    router_bias: list[float]           # the selection bias, on the host
    w13_t: list[torch.Tensor]          # per routed expert (D, 2I) = [gate; up]ᵀ (a view)
    w2: list[torch.Tensor]             # per routed expert (D, I) = down (a view)
    shared_w13_t: Optional[torch.Tensor]  # (D, S·2I): per shared slot [gate; up]ᵀ
    shared_w2_t: Optional[torch.Tensor]   # (S·I, D): the slots' downᵀ, stacked
    rows: "_SwiGLURows"                # k routed rows then S shared rows


@dataclass
class _SwiGLURows:
    """Preallocated rows [gate | up] -> act (float32), with their views made once: the
    k routed experts' rows, then the S shared slots' rows, activated in one pass."""
    gate_up: torch.Tensor              # (k + S, 2I)
    act: torch.Tensor                  # (k + S, I)
    routed: list[torch.Tensor]         # k (1, 2I) row views for the experts' outputs
    shared: Optional[torch.Tensor]     # (1, S·2I) view of the shared rows
    routed_act: list[torch.Tensor]     # k (I,) row views
    shared_act: Optional[torch.Tensor]  # (1, S·I) view
    gate: torch.Tensor                 # (k + S, I) views of gate_up's halves
    up: torch.Tensor

    @classmethod
    def allocate(cls, k: int, S: int, I: int) -> "_SwiGLURows":
        gu, act = torch.zeros(k + S, 2 * I), torch.zeros(k + S, I)
        return cls(gu, act, list(gu[:k].split(1)), gu[k:].view(1, -1) if S else None,
                   list(act[:k].unbind(0)), act[k:].view(1, -1) if S else None,
                   gu[:, :I], gu[:, I:])

    def activate(self) -> None:
        """act = silu(gate) · up for every row (2 calls)."""
        torch.mul(F.silu(self.gate), self.up, out=self.act)


def prepare_moe(packed: PackedMoE) -> CpuMoE:
    """Per-expert views of the packed weights plus the shared slots as one dense FFN."""
    E, S, I, D = packed.n_routed, packed.n_shared_slots, packed.expert_dim, packed.dim
    shared_w13_t = shared_w2_t = None
    if S:
        shared_w13_t = packed.w13[E:].reshape(S * 2 * I, D).t().contiguous()  # slot-major [g; u]
        shared_w2_t = packed.w2[E:].permute(0, 2, 1).reshape(S * I, D)      # (S·I, D)
    return CpuMoE(base=packed, router_t=packed.router_w.t(),
                  router_bias=packed.router_bias.tolist(),
                  w13_t=[w.t() for w in packed.w13[:E].unbind(0)],
                  w2=list(packed.w2[:E].unbind(0)),
                  shared_w13_t=shared_w13_t, shared_w2_t=shared_w2_t,
                  rows=_SwiGLURows.allocate(packed.top_k, S, I))


def moe_ffn_cpu(x: torch.Tensor, moe: CpuMoE, workspace=None,
                out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """MoE FFN (same contract as ``ops.moe.moe_ffn_torch``); one token runs the lean path."""
    p = moe.base
    if x.shape[0] != 1 or x.dtype != torch.float32 or p.router_w.dtype != torch.float32:
        return moe_ffn_torch(x, p, workspace, out)
    biased = torch.addmm(p.router_bias, x, moe.router_t)     # selection scores
    ids = torch.topk(biased, p.top_k).indices.tolist()[0]
    scores, bias = biased.tolist()[0], moe.router_bias
    logits = [scores[e] - bias[e] for e in ids]
    top = max(logits)
    exps = [math.exp(v - top) for v in logits]                 # softmax over the chosen
    total = sum(exps)
    rows = moe.rows
    for e, row in zip(ids, rows.routed):
        torch.mm(x, moe.w13_t[e], out=row)
    if moe.shared_w13_t is not None:
        torch.mm(x, moe.shared_w13_t, out=rows.shared)
    rows.activate()
    if moe.shared_w13_t is not None:
        res = (torch.mm(rows.shared_act, moe.shared_w2_t) if out is None
               else torch.mm(rows.shared_act, moe.shared_w2_t, out=out))
    else:
        res = torch.zeros_like(x) if out is None else out.zero_()
    acc = per_tensor("row0", res, lambda t: t[0]) if out is not None else res[0]
    for e, act, g in zip(ids, rows.routed_act, exps):
        acc.addmv_(moe.w2[e], act, alpha=g / total)
    return res

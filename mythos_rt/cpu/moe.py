"""Lean CPU MoE FFN for one token: host-side routing, one matmul per selected expert.

``prepare_moe`` keeps per-expert (transposed) weight views in Python lists, so picking
an expert costs no PyTorch call, and concatenates the shared slots back into one dense
SwiGLU. ``moe_ffn_cpu`` selects the token's k experts on ``logits + bias`` with one
``topk``, reads them and their logits on the host (free on a CPU), renormalizes the
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
    w13_t: list[torch.Tensor]          # per routed expert (D, 2I) = [gate; up]ᵀ (a view)
    w2: list[torch.Tensor]             # per routed expert (D, I) = down (a view)
    shared_w13_t: Optional[torch.Tensor]  # (D, 2·S·I) = [all shared gates; all shared ups]ᵀ
    shared_w2_t: Optional[torch.Tensor]   # (S·I, D)
    gate_up: "_SwiGLURows"             # k rows of [gate | up] for the routed experts
    shared: Optional["_SwiGLURows"]    # one row for the shared experts


@dataclass
class _SwiGLURows:
    """Preallocated rows [gate | up] -> act, with their views made once (float32)."""
    gate_up: torch.Tensor
    act: torch.Tensor
    gate_up_rows: list[torch.Tensor]
    act_rows: list[torch.Tensor]
    gate: torch.Tensor
    up: torch.Tensor

    @classmethod
    def allocate(cls, n: int, hidden: int) -> "_SwiGLURows":
        gu, act = torch.empty(n, 2 * hidden), torch.empty(n, hidden)
        return cls(gu, act, list(gu.split(1)), list(act.unbind(0)), gu[:, :hidden],
                   gu[:, hidden:])

    def activate(self) -> torch.Tensor:
        """act = silu(gate) · up (2 calls)."""
        return torch.mul(F.silu(self.gate), self.up, out=self.act)


def prepare_moe(packed: PackedMoE) -> CpuMoE:
    """Per-expert views of the packed weights plus the shared slots as one dense FFN."""
    E, S, I, D = packed.n_routed, packed.n_shared_slots, packed.expert_dim, packed.dim
    shared_w13_t = shared_w2_t = None
    if S:
        w13s = packed.w13[E:]                                     # (S, 2I, D)
        shared_w13_t = torch.cat([w13s[:, :I].reshape(S * I, D),
                                  w13s[:, I:].reshape(S * I, D)]).t()
        shared_w2_t = packed.w2[E:].permute(1, 0, 2).reshape(D, S * I).t()
    return CpuMoE(base=packed, router_t=packed.router_w.t(),
                  w13_t=[w.t() for w in packed.w13[:E].unbind(0)],
                  w2=list(packed.w2[:E].unbind(0)),
                  shared_w13_t=shared_w13_t, shared_w2_t=shared_w2_t,
                  gate_up=_SwiGLURows.allocate(packed.top_k, I),
                  shared=_SwiGLURows.allocate(1, S * I) if S else None)


def moe_ffn_cpu(x: torch.Tensor, moe: CpuMoE, workspace=None,
                out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """MoE FFN (same contract as ``ops.moe.moe_ffn_torch``); one token runs the lean path."""
    p = moe.base
    if x.shape[0] != 1 or x.dtype != torch.float32 or p.router_w.dtype != torch.float32:
        return moe_ffn_torch(x, p, workspace, out)
    logits = torch.mm(x, moe.router_t)
    ids = torch.topk(logits.add(p.router_bias), p.top_k).indices.tolist()[0]
    values = logits.tolist()[0]
    top = max(values[e] for e in ids)
    exps = [math.exp(values[e] - top) for e in ids]
    total = sum(exps)
    routed = moe.gate_up
    for e, row in zip(ids, routed.gate_up_rows):
        torch.mm(x, moe.w13_t[e], out=row)
    routed.activate()
    if moe.shared is not None:
        torch.mm(x, moe.shared_w13_t, out=moe.shared.gate_up)
        y = moe.shared.activate()
        res = torch.mm(y, moe.shared_w2_t) if out is None else torch.mm(y, moe.shared_w2_t, out=out)
    else:
        res = torch.zeros_like(x) if out is None else out.zero_()
    acc = per_tensor("row0", res, lambda t: t[0]) if out is not None else res[0]
    for e, act, g in zip(ids, routed.act_rows, exps):
        acc.addmv_(moe.w2[e], act, alpha=g / total)
    return res

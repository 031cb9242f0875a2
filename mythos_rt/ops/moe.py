"""Mixture-of-Experts FFN: compile-time expert packing, torch implementation, registrations.

The op family (docs/design.md "Reference semantics", MoE):

* ``moe_route(x, router_w, router_bias, top_k, out=None) -> (ids, weights)``:
  ``logits = x·Wᵀ`` (fp32 accumulation, kept in fp32), ``scores = softmax(logits)``,
  top-k chosen on ``logits + bias``, chosen scores renormalized to sum 1.
  ``ids`` int32 (N, k) in descending biased-logit order, ``weights`` fp32 (N, k).
* ``moe_ffn(x, packed, workspace=None, out=None, skip=None) -> (N, D)``: k routed SwiGLU
  experts per token weighted by the routing weights, plus the shared experts (always on,
  weight 1). ``skip``: an optional (1,) int32 device flag; nonzero says no row of the call
  is needed (a lazy-depth pass with no real position): the result is zeros and no
  expert weight is read (the Triton kernels read the flag on the device).

Packing (the ``pack_experts`` pass, with ``split_w13``/``split_w2``) turns the reference
parameters into one stacked weight set:
``w13[e] = [gate; up]`` (2I, D) and ``w2[e] = down`` (D, I) for ``E_tot = E + S`` experts,
where every shared expert (hidden k·I) is split exactly into k slices of hidden I that
are appended after the routed experts as always-selected experts ("shared slots",
``S = n_shared_experts·k``). ``down(silu(gate x)·up x)`` is a sum over hidden units, so
the sum of the k slices equals the unsplit expert.

Backends: ``torch`` (this file; composite PyTorch, the per-op reference, runs anywhere,
*not* CUDA-graph capturable: it loops over the experts present) and ``triton``
(``mythos_rt.triton_kernels.moe``; sync-free and capturable given a ``MoEWorkspace``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Optional, Tuple

import torch
import torch.nn.functional as F

from .registry import CPU_DTYPES, register

__all__ = ["PackedMoE", "moe_route_torch", "moe_ffn_torch", "skipped"]


@dataclass
class PackedMoE:
    """Stacked expert weights of one MoE FFN, routed experts first, then shared slots.

    Attributes
    ----------
    w13 : (E_tot, 2·I, D) storage dtype — rows [0, I) are ``gate``, rows [I, 2I) ``up``.
    w2 : (E_tot, D, I) storage dtype — ``down``.
    router_w : (E, D) storage dtype.
    router_bias : (E,) float32 — added to the logits for selection only.
    n_routed : E.  n_shared_slots : S = n_shared_experts·top_k.  top_k : k.  expert_dim : I.
    expert_start : an expert-parallel shard (``mythos_rt.parallel``) holds the routed
        experts ``expert_start .. expert_start + n_local - 1`` of the E the router scores
        and a share of the shared slots; the others' contributions are another rank's.
    """

    w13: torch.Tensor
    w2: torch.Tensor
    router_w: torch.Tensor
    router_bias: torch.Tensor
    n_routed: int
    n_shared_slots: int
    top_k: int
    expert_dim: int
    expert_start: int = 0

    @property
    def n_local(self) -> int:
        """Routed experts held here (E unless this is an expert-parallel shard)."""
        return self.w13.shape[0] - self.n_shared_slots

    @property
    def is_shard(self) -> bool:
        return self.n_local != self.n_routed

    @property
    def dim(self) -> int:
        return self.w13.shape[-1]

    @property
    def dtype(self) -> torch.dtype:
        return self.w13.dtype

    @property
    def device(self) -> torch.device:
        return self.w13.device

    @classmethod
    def build(cls, w: Mapping[str, torch.Tensor], cfg) -> "PackedMoE":
        """The one builder (``lower`` and ``lower.op_args``): ``w`` maps the IR op's weight
        roles router, router_bias and w13, w2 (stacked by the ``pack_experts`` pass) to
        tensors; the expert counts come from ``cfg``. The bias only steers the top-k choice
        and stays float32 whatever the weights' dtype (a bf16 model's included)."""
        k = cfg.n_experts_per_tok
        return cls(w13=w["w13"], w2=w["w2"], router_w=w["router"],
                   router_bias=w["router_bias"].float(),
                   n_routed=cfg.n_experts, n_shared_slots=cfg.n_shared_experts * k, top_k=k,
                   expert_dim=cfg.expert_dim)


def split_w13(gate: torch.Tensor, up: torch.Tensor, expert_dim: int) -> list[torch.Tensor]:
    """An expert's gate/up (m·I, D) as m packed (2I, D) blocks [gate slice; up slice].

    m = 1 for a routed expert; a shared expert of hidden k·I is exactly k experts of
    hidden I on its slices (the SwiGLU is elementwise over the hidden dim).
    """
    return [torch.cat([gate[s:s + expert_dim], up[s:s + expert_dim]])
            for s in range(0, gate.shape[0], expert_dim)]


def split_w2(down: torch.Tensor, expert_dim: int) -> list[torch.Tensor]:
    """An expert's down (D, m·I) as m (D, I) blocks, matching ``split_w13``'s slices."""
    return [down[:, s:s + expert_dim] for s in range(0, down.shape[1], expert_dim)]


# ---------------------------------------------------------------------------------------
# torch implementation (the per-op reference)
# ---------------------------------------------------------------------------------------

def moe_route_torch(x: torch.Tensor, router_w: torch.Tensor, router_bias: torch.Tensor,
                    top_k: int, out: Optional[Tuple[torch.Tensor, torch.Tensor]] = None):
    """Route tokens to experts.

    Parameters
    ----------
    x : (N, D) float32/float16/bfloat16.
    router_w : (E, D), same dtype as x.
    router_bias : (E,) float32, selection bias.
    top_k : experts per token.
    out : optional ``(ids, weights)`` buffers of at least (N, k) int32 / float32.

    Returns
    -------
    ids : (N, k) int32, chosen experts in descending ``logit + bias`` order.
    weights : (N, k) float32, ``softmax(logits)[ids]`` renormalized to sum 1.
    """
    logits = x.float() @ router_w.float().t()
    scores = torch.softmax(logits, dim=-1)
    _, ids = (logits + router_bias.float()).topk(top_k, dim=-1)
    w = scores.gather(-1, ids)
    w = w / w.sum(dim=-1, keepdim=True)
    ids = ids.to(torch.int32)
    if out is not None:
        ids_out, w_out = out
        n = x.shape[0]
        ids_out[:n].copy_(ids)
        w_out[:n].copy_(w)
        return ids_out[:n], w_out[:n]
    return ids, w


def skipped(skip: Optional[torch.Tensor], x: torch.Tensor,
            out: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """The zeros a ``moe_ffn`` call returns when its ``skip`` flag is set, else None (it
    must run). Reads the flag on the host: for the backends that synchronize anyway."""
    if skip is None or not int(skip[0]):
        return None
    return torch.zeros_like(x) if out is None else out.zero_()


def moe_ffn_torch(x: torch.Tensor, packed: PackedMoE, workspace=None,
                  out: Optional[torch.Tensor] = None,
                  skip: Optional[torch.Tensor] = None) -> torch.Tensor:
    """MoE FFN in composite PyTorch (same signature as the Triton backend).

    Parameters
    ----------
    x : (N, D) in the packed weights' dtype.
    packed : ``PackedMoE``.
    workspace : ignored (accepted for signature parity with the Triton backend).
    out : optional (N, D) output buffer in x's dtype.
    skip : optional (1,) int32 flag: nonzero, the result is zeros (module docstring).

    Returns
    -------
    (N, D) in x's dtype: ``Σ_j w_j·expert_{ids_j}(x)`` in slot order, plus the shared
    slots (weight 1), accumulated in float32. Each expert runs in the storage dtype, as
    the reference does. It loops over the experts present (host sync): not
    graph-capturable. An expert-parallel shard adds only the experts it holds.
    """
    del workspace
    done = skipped(skip, x, out)
    if done is not None:
        return done
    N, D = x.shape
    E, k, S, I = packed.n_local, packed.top_k, packed.n_shared_slots, packed.expert_dim
    ids, weights = moe_route_torch(x, packed.router_w, packed.router_bias, k)
    ids_l = ids.long() - packed.expert_start
    y = x.new_zeros(N, k, D)
    for e in ids_l.unique().tolist():
        if not 0 <= e < E:  # another rank's expert
            continue
        tok, slot = (ids_l == e).nonzero(as_tuple=True)
        gu = F.linear(x[tok], packed.w13[e])
        y[tok, slot] = F.linear(F.silu(gu[:, :I]) * gu[:, I:], packed.w2[e])
    acc = torch.zeros(N, D, dtype=torch.float32, device=x.device)
    for j in range(k):
        acc = acc + weights[:, j:j + 1] * y[:, j].float()
    if S:
        # All shared slots as one SwiGLU of hidden S·I: the concatenation of the slices
        # is exactly the unsplit shared experts, so one down-projection sums them.
        w13s = packed.w13[E:]                                  # (S, 2I, D)
        gate = w13s[:, :I].reshape(S * I, D)
        up = w13s[:, I:].reshape(S * I, D)
        down = packed.w2[E:].permute(1, 0, 2).reshape(D, S * I)
        acc = acc + F.linear(F.silu(F.linear(x, gate)) * F.linear(x, up), down).float()
    res = acc.to(x.dtype)
    if out is not None:
        out.copy_(res)
        return out
    return res


register("moe_route", "torch", "mythos_rt.ops.moe:moe_route_torch")
register("moe_route", "triton", "mythos_rt.triton_kernels.moe:moe_route_triton")
register("moe_ffn", "torch", "mythos_rt.ops.moe:moe_ffn_torch")
register("moe_ffn", "triton", "mythos_rt.triton_kernels.moe:moe_ffn_triton",
         workspace="mythos_rt.triton_kernels.moe:moe_workspace")
register("moe_ffn", "cpu", "mythos_rt.cpu.moe:moe_ffn_cpu",
         prepare="mythos_rt.cpu.moe:prepare_moe", bind="mythos_rt.cpu.moe:bind_moe_ffn_cpu",
         dtypes=CPU_DTYPES)


# ---------------------------------------------------------------------------------------
# moe_align: sort (token, slot) pairs by expert (the grouped GEMMs' metadata)
# ---------------------------------------------------------------------------------------

@dataclass
class MoEAlignment:
    """Expert-sorted pair layout (the contract of ``triton_kernels.moe.moe_align_triton``).

    counts (E+S,) int32, offsets (E+S,) int32, sorted_pairs (rows,) int32 (pair id
    ``token·(k+S) + slot``, -1 = padding), block_expert (blocks,) int32 (-1 = dead block);
    rb_max / n_blocks: host ints, the routed / total GEMM block counts (upper bounds).
    """
    counts: torch.Tensor
    offsets: torch.Tensor
    sorted_pairs: torch.Tensor
    block_expert: torch.Tensor
    rb_max: int
    n_blocks: int


def moe_align_sizes(n_tokens: int, n_experts: int, top_k: int, n_shared_slots: int,
                    block_m: int) -> Tuple[int, int, int, int]:
    """(rb_max, sb_per, rows, blocks): routed-block bound ``cdiv(N·k, BM) + min(E, N·k)``,
    blocks per shared slot ``cdiv(N, BM)``, sorted_pairs length, block_expert length."""
    p = n_tokens * top_k
    rb_max = -(-p // block_m) + min(n_experts, p)
    sb_per = -(-n_tokens // block_m)
    blocks = rb_max + n_shared_slots * sb_per
    return rb_max, sb_per, blocks * block_m, blocks


def moe_align_torch(ids: torch.Tensor, n_experts: int, n_shared_slots: int, block_m: int,
                    out: Optional[Tuple[torch.Tensor, ...]] = None) -> MoEAlignment:
    """Sort routed (token, slot) pairs by expert into ``block_m``-padded segments.

    Parameters
    ----------
    ids : (N, k) int32 expert ids from ``moe_route``.
    n_experts : E routed experts; n_shared_slots : S always-on slots after them.
    block_m : GEMM rows per block (a power of two).
    out : optional (counts, offsets, sorted_pairs, block_expert) buffers of at least the
        sizes ``moe_align_sizes`` gives.

    Returns
    -------
    MoEAlignment. Segment e starts at ``offsets[e]`` (segments in expert order, each
    padded to a multiple of block_m) and lists e's pairs in ascending pair order;
    padding and dead routed rows hold -1. Shared slot s owns the fixed segment
    ``rb_max·BM + s·sb_per·BM`` holding ``t·(k+S) + k + s`` for every token t.
    Ids outside [0, E) are left out (an expert shard's ids, shifted by its first
    expert: the other shards' pairs).
    """
    N, k = ids.shape
    E, S, bm, dev = n_experts, n_shared_slots, block_m, ids.device
    rb_max, sb_per, rows, blocks = moe_align_sizes(N, E, k, S, bm)
    i32 = dict(dtype=torch.int32, device=dev)
    flat = ids.reshape(-1).long()
    valid = (flat >= 0) & (flat < E)
    counts = torch.bincount(flat[valid], minlength=E)
    padded = (counts + bm - 1) // bm * bm
    starts = torch.cumsum(padded, 0) - padded
    q = torch.arange(N * k, device=dev)[valid]
    ex = flat[valid]
    order = torch.sort(ex, stable=True).indices            # expert-major, pair order within
    ex_sorted = ex[order]
    first_of = torch.cumsum(counts, 0) - counts
    rank = torch.arange(ex_sorted.numel(), device=dev) - first_of[ex_sorted]
    sorted_pairs = torch.full((rows,), -1, **i32)
    qs = q[order]
    sorted_pairs[starts[ex_sorted] + rank] = ((qs // k) * (k + S) + qs % k).to(torch.int32)
    t = torch.arange(sb_per * bm, device=dev)
    for s in range(S):
        seg = torch.where(t < N, t * (k + S) + k + s, -1).to(torch.int32)
        base = rb_max * bm + s * sb_per * bm
        sorted_pairs[base:base + sb_per * bm] = seg
    ends = starts + padded
    rows_of_block = torch.arange(rb_max, device=dev) * bm
    be = torch.searchsorted(ends, rows_of_block, right=True)
    be = torch.where(be < E, be, -1)
    block_expert = torch.cat([be.to(torch.int32),
                              (E + torch.arange(S * sb_per, device=dev) // max(sb_per, 1))
                              .to(torch.int32)])
    counts_all = torch.cat([counts.to(torch.int32), torch.full((S,), N, **i32)])
    offsets_all = torch.cat([starts.to(torch.int32),
                             (rb_max * bm + torch.arange(S, device=dev) * sb_per * bm)
                             .to(torch.int32)])
    res = (counts_all, offsets_all, sorted_pairs, block_expert)
    if out is not None:
        for buf, val in zip(out, res):
            if buf.numel() < val.numel():
                raise ValueError(f"out buffer holds {buf.numel()} elements, needs {val.numel()}")
            buf[:val.numel()].copy_(val)
        res = tuple(buf[:val.numel()] for buf, val in zip(out, res))
    return MoEAlignment(*res, rb_max=rb_max, n_blocks=blocks)


register("moe_align", "torch", "mythos_rt.ops.moe:moe_align_torch")
# CUDA backends (mythos_rt._C, built with MYTHOS_RT_BUILD_CUDA=1); see docs/cuda.md.
register("moe_route", "cuda", "mythos_rt.cuda.moe:moe_route_cuda")
register("moe_align", "cuda", "mythos_rt.cuda.moe:moe_align_cuda")

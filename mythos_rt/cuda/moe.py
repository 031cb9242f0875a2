"""CUDA MoE routing and alignment (``mythos_rt._C``): the ``cuda`` backend of ``moe_route``
and ``moe_align``. Contracts: ``mythos_rt.ops.moe.moe_route_torch`` / ``moe_align_torch``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Tuple

import torch

from mythos_rt.ops.moe import MoEAlignment

from ._ext import _C, check_contiguous, check_cuda, check_dtype, dtype_code, ptr, stream

__all__ = ["RouteWorkspace", "moe_route_cuda", "moe_align_cuda"]


@dataclass
class RouteWorkspace:
    """Scratch of the fused router for up to ``max_tokens`` tokens and E experts.

    logits (max_tokens, E) float32: per-token logits published by the blocks of a token
    tile; counters (max_tokens,) int32: per-tile arrival counts, zero between launches
    (the last block of a tile resets its counter, so replays need no memset).
    """
    logits: torch.Tensor
    counters: torch.Tensor

    @classmethod
    def allocate(cls, max_tokens: int, n_experts: int, device) -> "RouteWorkspace":
        n = max(1, max_tokens)
        return cls(logits=torch.empty(n, n_experts, dtype=torch.float32, device=device),
                   counters=torch.zeros(n, dtype=torch.int32, device=device))

    def fits(self, n_tokens: int, n_experts: int, device) -> bool:
        return (self.logits.shape[1] == n_experts and self.logits.shape[0] >= n_tokens
                and self.logits.device == device)


_DEFAULT_WS: dict = {}   # (device, E) -> RouteWorkspace, grown on demand (eager use only)


def _default_workspace(n_tokens: int, n_experts: int, device) -> RouteWorkspace:
    ws = _DEFAULT_WS.get((device, n_experts))
    if ws is None or not ws.fits(n_tokens, n_experts, device):
        ws = RouteWorkspace.allocate(max(n_tokens, ws.logits.shape[0] * 2 if ws else 0),
                                     n_experts, device)
        _DEFAULT_WS[(device, n_experts)] = ws
    return ws


def moe_route_cuda(x: torch.Tensor, router_w: torch.Tensor, router_bias: torch.Tensor,
                   top_k: int, out: Optional[Tuple[torch.Tensor, torch.Tensor]] = None,
                   workspace: Optional[RouteWorkspace] = None):
    """Fused router, one launch (contract of ``mythos_rt.ops.moe.moe_route_torch``).

    Parameters
    ----------
    x : (N, D) float32/float16/bfloat16, unit last stride.
    router_w : (E, D) contiguous, x's dtype; E ≤ ``_C.ROUTE_MAX_EXPERTS`` (1024).
    router_bias : (E,) float32.
    top_k : 1 ≤ k ≤ min(E, 32).
    out : optional (ids, weights) buffers of ≥ N rows, int32 / float32 (N, k) contiguous.
    workspace : optional ``RouteWorkspace``; without one a per-device scratch is used
        (grown on demand: warm it at the largest N before capturing a CUDA graph).

    Returns
    -------
    ids (N, k) int32 in descending ``logit + bias`` order (ties → lowest id),
    weights (N, k) float32 (softmax probabilities of ids, renormalized).
    """
    if x.dim() != 2 or x.stride(-1) != 1:
        raise ValueError(f"x must be (N, D) with unit last stride, got {tuple(x.shape)}")
    N, D = x.shape
    E = router_w.shape[0]
    check_cuda(x.device, router_w=router_w, router_bias=router_bias)
    code = dtype_code("x", x)
    check_dtype("router_w", router_w, x.dtype)
    check_dtype("router_bias", router_bias, torch.float32)
    if router_w.dim() != 2 or router_w.shape[1] != D:
        raise ValueError(f"router_w must be (E, {D}), got {tuple(router_w.shape)}")
    check_contiguous("router_w", router_w)
    if router_bias.numel() != E:
        raise ValueError(f"router_bias must be ({E},), got {tuple(router_bias.shape)}")
    if out is None:
        ids = torch.empty(N, top_k, dtype=torch.int32, device=x.device)
        wts = torch.empty(N, top_k, dtype=torch.float32, device=x.device)
    else:
        ids, wts = out
        if ids.shape[0] < N or wts.shape[0] < N or ids.shape[1:] != (top_k,) \
                or wts.shape[1:] != (top_k,):
            raise ValueError(f"out buffers must hold ({N}, {top_k}) rows")
        check_dtype("out[0] (ids)", ids, torch.int32)
        check_dtype("out[1] (weights)", wts, torch.float32)
        check_contiguous("out[0] (ids)", ids)
        check_contiguous("out[1] (weights)", wts)
        ids, wts = ids[:N], wts[:N]
    ws = workspace if workspace is not None else _default_workspace(N, E, x.device)
    if not ws.fits(N, E, x.device):
        raise ValueError(f"workspace holds logits {tuple(ws.logits.shape)} on "
                         f"{ws.logits.device}; this call needs ({N}, {E}) on {x.device}")
    _C.moe_route(x=ptr(x), n_tokens=N, dim=D, stride_x=x.stride(0), w=ptr(router_w),
                 n_experts=E, bias=ptr(router_bias), top_k=top_k, dtype=code, ids=ptr(ids),
                 weights=ptr(wts), out_rows=ids.shape[0], logits=ptr(ws.logits),
                 logits_numel=ws.logits.numel(),
                 counters=ptr(ws.counters), counters_numel=ws.counters.numel(),
                 stream=stream(x.device))
    return ids, wts


def moe_align_cuda(ids: torch.Tensor, n_experts: int, n_shared_slots: int, block_m: int,
                   out: Optional[Tuple[torch.Tensor, ...]] = None) -> MoEAlignment:
    """Expert alignment in one launch (contract of ``mythos_rt.ops.moe.moe_align_torch``;
    the layout the Triton grouped GEMMs read, see ``moe_align_triton``).

    ids : (N, k) int32 contiguous. out : optional (counts, offsets, sorted_pairs,
    block_expert) int32 buffers of at least ``moe_align_sizes`` elements; with them the
    call allocates nothing and is graph-capturable (grid sizes depend only on N).
    """
    if ids.dim() != 2:
        raise ValueError(f"ids must be (N, k), got {tuple(ids.shape)}")
    N, k = ids.shape
    check_cuda(ids.device)
    check_dtype("ids", ids, torch.int32)
    check_contiguous("ids", ids)
    rb_max, _sb_per, rows, blocks = _C.moe_align_sizes(N, n_experts, k, n_shared_slots,
                                                       block_m)
    if out is None:
        i32 = dict(dtype=torch.int32, device=ids.device)
        E_tot = n_experts + n_shared_slots
        out = (torch.empty(E_tot, **i32), torch.empty(E_tot, **i32),
               torch.empty(rows, **i32), torch.empty(blocks, **i32))
    names = ("counts", "offsets", "sorted_pairs", "block_expert")
    for name, buf in zip(names, out):
        check_cuda(ids.device, **{name: buf})
        check_dtype(name, buf, torch.int32)
        check_contiguous(name, buf)
    counts, offsets, sorted_pairs, block_expert = out
    rb_max, n_blocks = _C.moe_align(
        ids=ptr(ids), ids_numel=ids.numel(), n_tokens=N, top_k=k, n_experts=n_experts,
        n_shared=n_shared_slots, block_m=block_m, counts=ptr(counts),
        counts_numel=counts.numel(), offsets=ptr(offsets), offsets_numel=offsets.numel(),
        sorted_pairs=ptr(sorted_pairs), sorted_numel=sorted_pairs.numel(),
        block_expert=ptr(block_expert), block_expert_numel=block_expert.numel(),
        stream=stream(ids.device))
    E_tot = n_experts + n_shared_slots
    return MoEAlignment(counts[:E_tot], offsets[:E_tot], sorted_pairs[:rows],
                        block_expert[:blocks], rb_max=rb_max, n_blocks=n_blocks)

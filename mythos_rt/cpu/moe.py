"""Lean CPU MoE FFN for decode: host-side routing, one matmul per selected expert.

``prepare_moe`` keeps per-expert weight views in Python lists (picking an expert costs
no PyTorch call) and views of the shared slots (the plan holds the packed weights once).
For one token, ``moe_ffn_cpu`` computes the "front" [shared gate/up | router logits + bias]
in one buffer, reads the chosen experts and their logits on the host
(free on a CPU), renormalizes the chosen softmax scores there (the full softmax's
denominator cancels), runs every expert row through one SwiGLU pass, and accumulates
``w_j · down_j(silu(gate_j x) · up_j x)`` onto the shared experts' output with one
``addmv_`` each. No weight is copied; activations live in preallocated rows whose views
are made once. A decode batch (up to ``MAX_TOKENS`` tokens) runs token by token with
the shared slots batched. With the compiled kernels (``mythos_rt.cpu.native``), a batch
of up to ``kernel_max_tokens`` tokens (16 per expert) is one ``moe_rows`` call over
the same layout instead. Longer chunks (prefill) sort their (token, slot) pairs by
expert once and run one matmul pair per expert (``_moe_grouped``). bf16 weights stay
bf16 (half the bytes a decode token streams) and run ``moe_rows_bf16``, which widens
them to float32 in registers: decode batches where the CPU has bf16 hardware (oneDNN's
bf16 matmuls win chunks there), the same chunks as float32 where it has not; longer bf16
chunks and other dtypes run the torch implementation (``mythos_rt.ops.moe.moe_ffn_torch``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F

from ..ops.moe import PackedMoE, moe_ffn_torch, skipped
from . import native
from .memo import per_tensor

__all__ = ["CpuMoE", "prepare_moe", "moe_ffn_cpu", "bind_moe_ffn_cpu"]


@dataclass
class CpuMoE:
    """One MoE FFN laid out for decode, with its scratch rows."""
    base: PackedMoE
    shared_w13: torch.Tensor           # (S·2I, D): the shared slots' [gate; up] rows (a view)
    front_bias: torch.Tensor           # (S·2I + E,) = [0 | router bias], float32
    router_bias: list[float]           # the selection bias, on the host
    w13_t: list[torch.Tensor]          # per held routed expert (D, 2I) = [gate; up]ᵀ (a view)
    w2: list[torch.Tensor]             # per held routed expert (D, I) = down (a view)
    shared_w2: list[torch.Tensor]      # per shared slot (D, I) = down (a view)
    rows: "_Rows"
    row_kernel: Optional[native.Kernel] = None  # up to kernel_max_tokens in one call
    kernel_max_tokens: int = 0


@dataclass
class _Rows:
    """One token's scratch (float32), views made once. One buffer holds the k routed
    experts' [gate | up] rows, the S shared slots' rows, then the router logits, so that
    every expert row is activated in one SwiGLU pass."""
    routed: list[torch.Tensor]         # k (1, 2I) rows, one per chosen expert
    shared: torch.Tensor               # (1, S·2I): the shared slots' rows
    logits: torch.Tensor               # (1, E)
    gate: torch.Tensor                 # (k + S, I) halves of every [gate | up] row
    up: torch.Tensor
    act: torch.Tensor                  # (k + S, I)
    routed_act: list[torch.Tensor]     # k (I,) rows
    shared_act: Optional[torch.Tensor]  # (1, S·I)
    routed_gate: torch.Tensor          # (k, I) views: the routed rows only
    routed_up: torch.Tensor
    routed_act_all: torch.Tensor

    @classmethod
    def allocate(cls, k: int, S: int, I: int, E: int) -> "_Rows":
        flat = torch.zeros(1, (k + S) * 2 * I + E)
        gu = flat[0, :(k + S) * 2 * I].view(k + S, 2 * I)
        act = torch.zeros(k + S, I)
        return cls(list(gu[:k].split(1)), flat[:, k * 2 * I:(k + S) * 2 * I],
                   flat[:, (k + S) * 2 * I:],
                   gu[:, :I], gu[:, I:], act, list(act[:k].unbind(0)),
                   act[k:].view(1, -1) if S else None, gu[:k, :I], gu[:k, I:], act[:k])

    def activate(self) -> None:
        """act = silu(gate) · up for every row (2 calls)."""
        torch.mul(F.silu(self.gate), self.up, out=self.act)

    def activate_routed(self) -> None:
        """The same for the k routed rows only."""
        torch.mul(F.silu(self.routed_gate), self.routed_up, out=self.routed_act_all)


def prepare_moe(packed: PackedMoE) -> CpuMoE:
    """Per-expert and shared-slot views of the packed weights (no copy of a weight: the
    kernel reads the front's rows from w13's shared slots and the router in place). An
    expert-parallel shard (``PackedMoE.expert_start``) keeps the held experts' views and
    adds only their contributions."""
    E, S, I, D = packed.n_routed, packed.n_shared_slots, packed.expert_dim, packed.dim
    L = packed.n_local
    front_bias = torch.cat([torch.zeros(S * 2 * I), packed.router_bias.float()])
    moe = CpuMoE(base=packed, shared_w13=packed.w13[L:].reshape(S * 2 * I, D),
                 front_bias=front_bias, router_bias=packed.router_bias.tolist(),
                 w13_t=[w.t() for w in packed.w13[:L].unbind(0)],
                 w2=list(packed.w2[:L].unbind(0)), shared_w2=list(packed.w2[L:].unbind(0)),
                 rows=_Rows.allocate(packed.top_k, S, I, E))
    lib = native.library()
    bf16 = packed.w13.dtype == torch.bfloat16
    if lib is not None and packed.w13.dtype in (torch.float32, torch.bfloat16):
        matrices = ("router", "w13", "w2")
        moe.row_kernel = native.kernel(
            lib, "moe_rows_bf16" if bf16 else "moe_rows", native.MoeRow,
            dict(D=D, E=E, S=S, I=I, k=packed.top_k, L=L, start=packed.expert_start),
            dict(router=packed.router_w, front_bias=front_bias,
                 router_bias=packed.router_bias.float().contiguous(),
                 w13=packed.w13, w2=packed.w2), bf16=matrices if bf16 else ())
        moe.kernel_max_tokens = (BF16_KERNEL_MAX_TOKENS if bf16 and native.native_bf16_matmul()
                                 else KERNEL_TOKENS_PER_EXPERT * E // packed.top_k)
    return moe


# Without the kernel, up to this many tokens (decode batches) run token by token; more
# (prefill) are grouped by expert.
MAX_TOKENS = 8
# The kernel reads each chosen expert once per call, but its expert products are not a
# blocked GEMM: it beats the grouped matmuls while the tokens per expert are few (64
# experts, top-4, on 2 cores: 4.2x at 16 tokens, 1.6x at 256, 0.64x at 1024), so it takes
# chunks of up to this many tokens per expert on average (a 256-token prefill chunk there).
KERNEL_TOKENS_PER_EXPERT = 16
# bf16 weights on a CPU that multiplies bf16 in hardware (native.native_bf16_matmul): the
# kernel widens every weight it reads, and torch's bf16 matmuls (oneDNN) win on chunks: a
# 64-token mythos_1b prompt ran at 0.41x the eager reference through the kernel on a Zen 4
# (bench/results/2026-12-01-cpu-mythos_1b-bf16-kernel-prefill.json), so the kernel takes
# decode batches only. Without bf16 hardware those matmuls are the slow path and the
# kernel takes chunks as for float32 weights.
BF16_KERNEL_MAX_TOKENS = 16


def _route(biased: torch.Tensor, top_k: int, bias: list[float]):
    """Per token: the k chosen experts and their renormalized softmax weights (host)."""
    ids = torch.topk(biased, top_k).indices.tolist()
    routes = []
    for row, chosen in zip(biased.tolist(), ids):
        logits = [row[e] - bias[e] for e in chosen]
        top = max(logits)
        exps = [math.exp(v - top) for v in logits]             # softmax over the chosen
        total = sum(exps)
        routes.append((chosen, [g / total for g in exps]))
    return routes


def _held(routes, p: PackedMoE):
    """The routes' experts this MoE holds, numbered from its first (an expert-parallel
    shard adds only those; the whole MoE holds every one)."""
    if not p.is_shard:
        return routes
    lo, n = p.expert_start, p.n_local
    return [([e - lo for e in ids if 0 <= e - lo < n],
             [g for e, g in zip(ids, weights) if 0 <= e - lo < n]) for ids, weights in routes]


def moe_ffn_cpu(x: torch.Tensor, moe: CpuMoE, workspace=None,
                out: Optional[torch.Tensor] = None,
                skip: Optional[torch.Tensor] = None) -> torch.Tensor:
    """MoE FFN (same contract as ``ops.moe.moe_ffn_torch``); up to ``MAX_TOKENS`` tokens
    run the lean path."""
    done = skipped(skip, x, out)
    if done is not None:
        return done
    p = moe.base
    N = x.shape[0]
    if moe.row_kernel is not None and N <= moe.kernel_max_tokens:
        res = native.run_bound(lambda target: bind_moe_ffn_cpu(x, moe, workspace, target), x, out)
        if res is not None:
            return res
    if x.dtype != torch.float32 or p.router_w.dtype != torch.float32:
        return moe_ffn_torch(x, p, workspace, out)
    if N > MAX_TOKENS:
        return _moe_grouped(x, moe, out)
    rows = moe.rows
    if N == 1:  # the front into the rows' buffer; one SwiGLU pass for all rows
        _front(x, moe, rows.shared, rows.logits)
        routes = _held(_route(rows.logits, p.top_k, moe.router_bias), p)
        for e, row in zip(routes[0][0], rows.routed):
            torch.mm(x, moe.w13_t[e], out=row)
        rows.activate()
        res = _shared_output(rows.shared_act, x, moe, out)
    else:
        gu, biased = _front(x, moe)
        routes = _held(_route(biased, p.top_k, moe.router_bias), p)
        res = _shared_output(_shared_act(gu, p), x, moe, out)
    for n, (ids, weights) in enumerate(routes):
        if N > 1:
            for e, row in zip(ids, rows.routed):
                torch.mm(x[n:n + 1], moe.w13_t[e], out=row)
            rows.activate_routed()
        acc = per_tensor("row0", res, lambda t: t[0]) if N == 1 and out is not None else res[n]
        for e, act, g in zip(ids, rows.routed_act, weights):
            acc.addmv_(moe.w2[e], act, alpha=g)
    return res


def bind_moe_ffn_cpu(x: torch.Tensor, moe: CpuMoE, workspace=None,
                     out: Optional[torch.Tensor] = None, skip: Optional[torch.Tensor] = None):
    """``moe_ffn_cpu`` for up to ``kernel_max_tokens`` tokens as a prebound call of the
    compiled kernel, or None where that does not apply (more tokens, rows not contiguous
    in the weights' dtype, no kernel, no ``out``). bf16 weights: through float32 staging
    rows (``native.bind_staged``). ``skip``: the call reads the flag first (on the host,
    free on a CPU) and zeroes ``out`` instead when it is set."""
    if skip is not None:
        launch = bind_moe_ffn_cpu(x, moe, workspace, out)
        if launch is None:
            return None

        def run():
            if skipped(skip, x, out) is None:
                launch()
        return run
    if moe.base.w13.dtype != torch.bfloat16:
        return native.bind_rows(moe.row_kernel, x, out, moe.kernel_max_tokens)
    return native.bind_staged(lambda x32, out32: native.bind_rows(
        moe.row_kernel, x32, out32, moe.kernel_max_tokens), x, out)


def _moe_grouped(x: torch.Tensor, moe: CpuMoE, out: Optional[torch.Tensor]) -> torch.Tensor:
    """Many tokens (prefill): the (token, slot) pairs sorted by expert once, then one
    gate/up and one down matmul per expert over its contiguous run of gathered rows, and
    the weighted rows added back onto the shared experts' output."""
    p = moe.base
    k, I = p.top_k, p.expert_dim
    gu, biased = _front(x, moe)
    top = torch.topk(biased, k)
    weights = torch.softmax(top.values - p.router_bias[top.indices], -1)  # chosen, renormed
    flat = top.indices.reshape(-1)
    order = torch.argsort(flat, stable=True)
    tok = order.div(k, rounding_mode="floor")
    rows = x.index_select(0, tok)                                   # pairs, expert-major
    ys = torch.empty_like(rows)
    start = 0
    for e, count in enumerate(torch.bincount(flat, minlength=p.n_routed).tolist()):
        if count:
            seg, held = slice(start, start + count), e - p.expert_start
            if 0 <= held < p.n_local:
                act = _swiglu(torch.mm(rows[seg], moe.w13_t[held]), I)
                torch.mm(act, moe.w2[held].t(), out=ys[seg])
            else:  # another shard's expert
                ys[seg].zero_()
            start += count
    ys.mul_(weights.reshape(-1)[order, None])
    return _shared_output(_shared_act(gu, p), x, moe, out).index_add_(0, tok, ys)


def _front(x: torch.Tensor, moe: CpuMoE, gu: Optional[torch.Tensor] = None,
           biased: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The shared slots' [gate | up] (N, S·2I) and the biased router logits (N, E) of x,
    into ``gu`` and ``biased`` when given."""
    p, S2 = moe.base, moe.shared_w13.shape[0]
    router_bias = moe.front_bias[S2:]
    if gu is None:
        gu = torch.mm(x, moe.shared_w13.t())
    else:
        torch.mm(x, moe.shared_w13.t(), out=gu)
    if biased is None:
        biased = torch.addmm(router_bias, x, p.router_w.t())
    else:
        torch.addmm(router_bias, x, p.router_w.t(), out=biased)
    return gu, biased


def _shared_act(gu: torch.Tensor, p: PackedMoE) -> Optional[torch.Tensor]:
    """(N, S·I) SwiGLU activations of the shared slots from their [gate | up], or None."""
    if not gu.shape[1]:
        return None
    N = gu.shape[0]
    return _swiglu(gu.reshape(N, -1, 2 * p.expert_dim), p.expert_dim).view(N, -1)


def _shared_output(act: Optional[torch.Tensor], x: torch.Tensor, moe: CpuMoE,
                   out: Optional[torch.Tensor]) -> torch.Tensor:
    """The shared experts' down projection (zeros without shared experts), into ``out``:
    one product per slot, summed."""
    if act is None:
        return torch.zeros_like(x) if out is None else out.zero_()
    I = moe.base.expert_dim
    res = torch.mm(act[:, :I], moe.shared_w2[0].t(), out=out)
    for s, w in enumerate(moe.shared_w2[1:], 1):
        res.addmm_(act[:, s * I:(s + 1) * I], w.t())
    return res


def _swiglu(gate_up: torch.Tensor, hidden: int) -> torch.Tensor:
    return F.silu(gate_up[..., :hidden]).mul_(gate_up[..., hidden:])

"""Lean CPU recurrent step: loop prologue and epilogue in a few in-place PyTorch calls.

``prepare_loop`` folds each loop index's LoRA scale into its own down-projection and
caches the loop-index embeddings; ``loop_epilogue_cpu`` then runs LoRA (two matmuls), the
LTI update (in place, in the reference's order), the ACT update and the next prologue.
It uses that ``halted`` is exactly ``cum_p >= threshold`` (cum_p only grows), so the
rows crossing the threshold this step are known from one comparison; a single row
(batch-1 decode) does the ACT arithmetic on the host in float32 scalars. With the
compiled kernels (``mythos_rt.cpu.native``) the whole epilogue of any number of rows is
one ``loop_epilogue_rows`` call (``loop_epilogue_rows_bf16`` for a bf16 model: its rows
widened, summed in float32, h rounded once as the torch implementation does). Same
contract as ``mythos_rt.ops.recurrent``; the prologue of other dtypes and, without the
kernels, their epilogue run the torch implementation.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import numpy as np
import torch

from ..ops.recurrent import (ACTState, LoopParams, loop_embedding, loop_epilogue_torch,
                             loop_prologue_torch)
from . import native
from .memo import per_tensor
from .norm import rms_normalize

__all__ = ["CpuLoop", "prepare_loop", "loop_prologue_cpu", "loop_epilogue_cpu",
           "bind_loop_epilogue_cpu"]


@dataclass
class CpuLoop:
    """LoopParams plus per-loop-index LoRA down-projections and embeddings (float32)."""
    base: LoopParams
    lora_down_t: list[torch.Tensor]        # [t] (D, r) = (lora_down scaled by lora_scale[t])ᵀ,
                                           # a transposed view of a contiguous (r, D)
    embeddings: dict[int, torch.Tensor] = field(default_factory=dict)  # t -> (D,), filled on use
    row_kernel: Optional[native.Kernel] = None  # any rows' epilogue in one compiled call
    row_dtype: torch.dtype = torch.float32      # the rows' storage dtype it takes

    def lora_down_at(self, t: int) -> torch.Tensor:
        """Loop index t's scaled down-projection (D, r); indices past max_loops use the last."""
        return self.lora_down_t[min(t, self.base.max_loops - 1)]

    def embedding(self, t: int) -> torch.Tensor:
        if t not in self.embeddings:
            p = self.base
            self.embeddings[t] = loop_embedding(t, p.dim, p.loop_dim, p.norm_w.device)
        return self.embeddings[t]


def prepare_loop(params: LoopParams) -> CpuLoop:
    """Fold the LoRA scale rows into the down-projection, one matrix per loop index."""
    down = params.lora_down.double()
    scaled = [(down * params.lora_scale[t].double()[:, None]).float().t()
              for t in range(params.max_loops)]
    loop = CpuLoop(base=params, lora_down_t=scaled)
    for t in range(params.max_loops + 1):
        loop.embedding(t)
    lib = native.library()
    if lib is not None and params.lora_B.dtype in (torch.float32, torch.bfloat16):
        f32 = dict(dtype=torch.float32)
        bf16 = params.lora_B.dtype == torch.bfloat16  # a bf16 model: bf16 rows
        loop.row_dtype = params.lora_B.dtype
        loop.row_kernel = native.kernel(
            lib, "loop_epilogue_rows_bf16" if bf16 else "loop_epilogue_rows", native.LoopRow,
            dict(D=params.dim, r=params.lora_B.shape[0], eps=params.eps,
                 threshold=params.threshold),
            dict(lora_B=params.lora_B.to(**f32).contiguous(), A=params.A.to(**f32).contiguous(),
                 inj_B=params.inj_B.to(**f32).contiguous(),
                 halt_w=params.halt_w.to(**f32).contiguous(),
                 halt_b=params.halt_b.to(**f32).contiguous(),
                 norm_w=params.norm_w.to(**f32).contiguous()))
    return loop


def _combined(h, e, loop: CpuLoop, t: int, out: Optional[torch.Tensor]) -> torch.Tensor:
    """rmsnorm(h + loop_embed(t) + e) * norm_w, summed in the reference's order."""
    s = torch.add(h, loop.embedding(t)).add_(e)
    return rms_normalize(s, loop.base.norm_w, loop.base.eps, out)


def loop_prologue_cpu(h, e, params: CpuLoop, t: int, out=None):
    """``loop_prologue`` (see ``ops.recurrent.loop_prologue_torch``)."""
    if h.dtype != torch.float32:
        return loop_prologue_torch(h, e, params.base, t, out)
    return _combined(h, e, params, t, out)


def _act_one_row(h, prob, state: ACTState, threshold: np.float32) -> None:
    """The ACT update of a single row with its scalars on the host, in float32 as on device."""
    h_out, cum_p, halted = per_tensor("act_row", state.cum_p,
                                      lambda c: (state.h_out[:1], c[:1], state.halted[:1]))
    cum = np.float32(float(cum_p))
    if cum >= threshold:  # halted earlier: contributes nothing
        return
    p = np.float32(float(prob))
    total = np.float32(cum + p)
    crossing = total >= threshold
    weight = max(np.float32(1.0) - cum, np.float32(0.0)) if crossing else p
    if weight:
        h_out.add_(h, alpha=float(weight))
    cum_p.fill_(float(total))
    if crossing:
        halted.fill_(True)
        state.n_running.sub_(1)


def bind_loop_epilogue_cpu(block_out, h, e, params: CpuLoop, t: int, state: ACTState,
                           next_combined=None):
    """``loop_epilogue_cpu`` of (N, D) rows (and the next prologue) as a prebound call of
    the compiled kernel, or None where that does not apply (no kernel, not contiguous
    rows of the model's dtype (float32, or bf16 for a bf16 model), ACT state too small or
    of another layout)."""
    k = params.row_kernel
    rows = params.row_dtype
    if (k is None or h.dim() != 2 or h.shape[0] > state.n_max
            or any(t is not None and t.dtype != rows for t in (block_out, h, e, next_combined))
            or state.h_out.dtype != rows or state.halted.dtype != torch.bool
            or state.n_running.dtype != torch.int32
            or not native.contiguous(block_out, h, e, next_combined, state.cum_p, state.halted,
                                     state.h_out, state.n_running)):
        return None
    down = params.lora_down_at(t)   # the kernel reads its (r, D) memory
    emb = None if next_combined is None else params.embedding(t + 1)
    return native.prebound(
        k.fn, k.ref, down.data_ptr(), block_out.data_ptr(), h.data_ptr(), e.data_ptr(),
        h.shape[0], state.cum_p.data_ptr(), state.halted.data_ptr(), state.h_out.data_ptr(),
        state.n_running.data_ptr(), native.address(emb), native.address(next_combined),
        keep=(down, block_out, h, e, state, emb, next_combined))


def loop_epilogue_cpu(block_out, h, e, params: CpuLoop, t: int, state: ACTState,
                      next_combined=None) -> None:
    """``loop_epilogue`` in place (see ``ops.recurrent.loop_epilogue_torch``)."""
    p = params.base
    N = h.shape[0]
    if state.n_max < N:
        raise ValueError(f"ACTState holds {state.n_max} rows; this step needs {N}")
    launch = bind_loop_epilogue_cpu(block_out, h, e, params, t, state, next_combined)
    if launch is not None:
        return launch()
    if h.dtype != torch.float32:
        return loop_epilogue_torch(block_out, h, e, p, t, state, next_combined)
    z = torch.mm(block_out, params.lora_down_at(t))
    out = torch.addmm(block_out, z, p.lora_B)                   # block_out + LoRA delta
    torch.addcmul(out, p.A, h, out=h).addcmul_(p.inj_B, e)     # out + A·h + B·e
    prob = torch.sigmoid(torch.addmv(p.halt_b, h, p.halt_w))
    if N == 1:
        _act_one_row(h, prob, state, np.float32(p.threshold))
    else:
        cum, halted, h_out = state.cum_p[:N], state.halted[:N], state.h_out[:N]
        running = ~halted
        crossing = (cum + prob) >= p.threshold
        weight = torch.where(crossing, (1.0 - cum).clamp_(min=0), prob).mul_(running)
        h_out.addcmul_(weight[:, None], h)
        cum.addcmul_(prob, running)
        newly = crossing.logical_and_(running)
        state.n_running.sub_(newly.sum())
        halted.logical_or_(newly)
    if next_combined is not None:
        _combined(h, e, params, t + 1, next_combined)

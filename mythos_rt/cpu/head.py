"""Lean CPU output head: the decode rows' logits in one call of the compiled kernels.

Up to ``KERNEL_MAX_TOKENS`` rows (decode) run ``head_rows`` (float32) or
``head_rows_bf16`` (bf16 weights widened in registers, float32 sums, the rows staged
through float32) of ``mythos_rt.cpu.native`` over the op's own weight: the team splits
the vocabulary rows, each streaming its stretch once for all the step's rows. Longer
chunks (prefill: a large matmul, bf16 in oneDNN where the CPU has bf16 hardware; without
it the kernel takes them too, ``native.kernel_row_limit``) and machines without the
kernels run ``mythos_rt.ops.head.head_torch``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from ..ops.head import HeadWeights, head_torch
from . import native

__all__ = ["CpuHead", "prepare_head", "head_cpu", "bind_head_cpu"]

# As for the dense FFN (mythos_rt.cpu.ffn): past a few rows a blocked GEMM wins.
KERNEL_MAX_TOKENS = 16


@dataclass
class CpuHead:
    base: HeadWeights
    row_kernel: Optional[native.Kernel] = None  # up to max_rows rows in one call
    max_rows: int = KERNEL_MAX_TOKENS  # more only for bf16 without bf16 hardware


def prepare_head(w: HeadWeights) -> CpuHead:
    """Bind the compiled row kernel to the head's weight (float32 or bf16, contiguous)."""
    head = CpuHead(base=w)
    lib = native.library()
    bf16 = w.w.dtype == torch.bfloat16
    if lib is not None and w.w.dtype in (torch.float32, torch.bfloat16) and w.w.is_contiguous():
        head.row_kernel = native.kernel(lib, "head_rows_bf16" if bf16 else "head_rows",
                                        native.HeadRow, dict(V=w.w.shape[0], D=w.w.shape[1]),
                                        dict(w=w.w), bf16=("w",) if bf16 else ())
        head.max_rows = native.kernel_row_limit(KERNEL_MAX_TOKENS, w.w.dtype)
    return head


def head_cpu(x: torch.Tensor, w: CpuHead, out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``head`` (see ``ops.head.head_torch``)."""
    if w.row_kernel is not None and x.dim() == 2 and x.shape[0] <= w.max_rows:
        res = native.run_bound(lambda target: bind_head_cpu(x, w, target), x, out,
                               width=w.base.w.shape[0])
        if res is not None:
            return res
    return head_torch(x, w.base, out)


def bind_head_cpu(x: torch.Tensor, w: CpuHead, out: Optional[torch.Tensor] = None):
    """``head_cpu`` of up to ``w.max_rows`` rows as a prebound call of the compiled
    kernel, or None where that does not apply (more rows, rows not contiguous in the
    weight's dtype, no kernel, no ``out``). bf16: through float32 staging rows
    (``native.bind_staged``)."""
    V = w.base.w.shape[0]

    def bind32(x32: torch.Tensor, out32: Optional[torch.Tensor]):
        return native.bind_rows(w.row_kernel, x32, out32, w.max_rows, width=V)
    if w.base.w.dtype == torch.bfloat16:
        return native.bind_staged(bind32, x, out)
    return bind32(x, out)

"""Lean CPU output head: the decode rows' logits in one call of the compiled kernels.

Up to ``KERNEL_MAX_TOKENS`` rows (decode) run ``head_rows`` (float32) or
``head_rows_bf16`` (bf16 weights widened in registers, float32 sums, the rows staged
through float32) of ``mythos_rt.cpu.native`` over the op's own weight: the team splits
the vocabulary rows, each streaming its stretch once for all the step's rows. Longer
chunks (prefill: a large matmul, bf16 in oneDNN) and machines without the kernels run
``mythos_rt.ops.head.head_torch``.
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
    row_kernel: Optional[native.Kernel] = None  # up to KERNEL_MAX_TOKENS rows in one call


def prepare_head(w: HeadWeights) -> CpuHead:
    """Bind the compiled row kernel to the head's weight (float32 or bf16, contiguous)."""
    head = CpuHead(base=w)
    lib = native.library()
    bf16 = w.w.dtype == torch.bfloat16
    if lib is not None and w.w.dtype in (torch.float32, torch.bfloat16) and w.w.is_contiguous():
        head.row_kernel = native.kernel(lib, "head_rows_bf16" if bf16 else "head_rows",
                                        native.HeadRow, dict(V=w.w.shape[0], D=w.w.shape[1]),
                                        dict(w=w.w), bf16=("w",) if bf16 else ())
    return head


def head_cpu(x: torch.Tensor, w: CpuHead, out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``head`` (see ``ops.head.head_torch``)."""
    if w.row_kernel is not None and x.dim() == 2 and x.shape[0] <= KERNEL_MAX_TOKENS:
        target = (out if out is not None and out.is_contiguous()
                  else torch.empty(x.shape[0], w.base.w.shape[0], dtype=x.dtype))
        launch = bind_head_cpu(x, w, target)
        if launch is not None:
            launch()
            return target if out is None or target is out else out.copy_(target)
    return head_torch(x, w.base, out)


def bind_head_cpu(x: torch.Tensor, w: CpuHead, out: Optional[torch.Tensor] = None):
    """``head_cpu`` of up to ``KERNEL_MAX_TOKENS`` rows as a prebound call of the compiled
    kernel, or None where that does not apply (more rows, rows not contiguous in the
    weight's dtype, no kernel, no ``out``). bf16: through float32 staging rows
    (``native.bind_staged``)."""
    if w.base.w.dtype == torch.bfloat16:
        return native.bind_staged(lambda x32, out32: _bind_rows(x32, w, out32), x, out)
    return _bind_rows(x, w, out)


def _bind_rows(x: torch.Tensor, w: CpuHead, out: Optional[torch.Tensor]):
    """The prebound kernel call of ``bind_head_cpu`` on float32 rows."""
    k = w.row_kernel
    if (k is None or x.dim() != 2 or not 1 <= x.shape[0] <= KERNEL_MAX_TOKENS
            or x.dtype != torch.float32 or out is None or out.dtype != torch.float32
            or out.shape != (x.shape[0], w.base.w.shape[0]) or not native.contiguous(x, out)):
        return None
    call = native.prebound(k.fn, k.ref, x.data_ptr(), x.shape[0], out.data_ptr(), keep=(x, out))

    def launch():
        call()
        return out
    return launch

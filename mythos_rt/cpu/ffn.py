"""Lean CPU SwiGLU FFN family: the dense FFN's decode rows in one call of the compiled
kernels, and the ``swiglu`` activation.

Up to ``KERNEL_MAX_TOKENS`` rows (decode) run ``ffn_rows`` of ``mythos_rt.cpu.native`` over the
op's own weights (nothing is copied): gate/up rows split among threads, each row of the
weights read once for all the step's rows, then the down projection. bf16 weights stay
bf16 and run ``ffn_rows_bf16`` (widened in registers, float32 sums, the rows staged
through float32). Longer chunks (prefill: large matmuls, bf16 ones in oneDNN where the
CPU has bf16 hardware; without it the kernel takes them too, ``native.kernel_row_limit``)
and machines without the kernels run the torch composite
(``mythos_rt.ops.ffn.dense_ffn_torch``), as do other dtypes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

import torch.nn.functional as F

from ..ops.ffn import DenseFFN, dense_ffn_torch, swiglu_torch
from . import native

__all__ = ["CpuFFN", "prepare_dense_ffn", "dense_ffn_cpu", "bind_dense_ffn_cpu", "swiglu_cpu"]

# The kernel reads the weights once for all rows but multiplies without a GEMM's
# blocking: past about this many rows PyTorch's matmuls are faster (dim 256, hidden 1024,
# 2 cores: 1.13x at 16 rows, 0.88x at 32).
KERNEL_MAX_TOKENS = 16


@dataclass
class CpuFFN:
    base: DenseFFN
    row_kernel: Optional[native.Kernel] = None  # up to max_rows rows in one call
    max_rows: int = KERNEL_MAX_TOKENS  # more than KERNEL_MAX_TOKENS only for bf16 without
    # bf16 hardware (native.kernel_row_limit)

    @property
    def hidden(self) -> int:
        return self.base.hidden


def prepare_dense_ffn(w: DenseFFN) -> CpuFFN:
    """Bind the compiled row kernel to the FFN's weights (float32 or bf16, contiguous)."""
    ffn = CpuFFN(base=w)
    lib = native.library()
    bf16 = w.w13.dtype == torch.bfloat16
    if (lib is not None and w.w13.dtype in (torch.float32, torch.bfloat16)
            and w.down.dtype == w.w13.dtype and native.contiguous(w.w13, w.down)):
        ffn.row_kernel = native.kernel(lib, "ffn_rows_bf16" if bf16 else "ffn_rows",
                                       native.FfnRow, dict(D=w.down.shape[0], H=w.down.shape[1]),
                                       dict(w13=w.w13, down=w.down),
                                       bf16=("w13", "down") if bf16 else ())
        ffn.max_rows = native.kernel_row_limit(KERNEL_MAX_TOKENS, w.w13.dtype)
    return ffn


def dense_ffn_cpu(x: torch.Tensor, w: CpuFFN, out: Optional[torch.Tensor] = None,
                  gate_up: Optional[torch.Tensor] = None,
                  act: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``dense_ffn`` (see ``ops.ffn.dense_ffn_torch``)."""
    if w.row_kernel is not None:
        res = native.run_bound(lambda target: bind_dense_ffn_cpu(x, w, target), x, out)
        if res is not None:
            return res
    return dense_ffn_torch(x, w.base, out, gate_up, act)


def bind_dense_ffn_cpu(x: torch.Tensor, w: CpuFFN, out: Optional[torch.Tensor] = None,
                       gate_up: Optional[torch.Tensor] = None,
                       act: Optional[torch.Tensor] = None):
    """``dense_ffn_cpu`` of up to ``w.max_rows`` rows as a prebound call of the compiled
    kernel (its own scratch: ``gate_up``/``act`` are left alone), or None where that does
    not apply (more rows, not contiguous rows in the weights' dtype, no kernel, no
    ``out``). bf16 weights: through float32 staging rows (``native.bind_staged``)."""
    if w.base.w13.dtype != torch.bfloat16:
        return native.bind_rows(w.row_kernel, x, out, w.max_rows)
    return native.bind_staged(
        lambda x32, out32: native.bind_rows(w.row_kernel, x32, out32, w.max_rows), x, out)


def swiglu_cpu(gate_up: torch.Tensor, out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``swiglu`` (see ``ops.ffn.swiglu_torch``)."""
    if (gate_up.dtype != torch.float32 or gate_up.shape[-1] % 2
            or (out is not None and 2 * out.shape[-1] != gate_up.shape[-1])):
        return swiglu_torch(gate_up, out)  # its errors, and an ``out`` with padding
    g, u = gate_up.chunk(2, dim=-1)
    return torch.mul(F.silu(g), u) if out is None else torch.mul(F.silu(g), u, out=out)

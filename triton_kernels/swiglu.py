"""SwiGLU activation ``silu(gate) * up`` over a fused [gate | up] projection (Triton).

Elementwise: program (row, block) reads BLOCK_I gate and BLOCK_I up values of one row and
writes BLOCK_I outputs, in float32. ``swiglu_triton`` has the signature of
``mythos_rt.ops.ffn.swiglu_torch``.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from ..ops.ffn import swiglu_half_width
from ._rowwise import as_rows


@triton.jit
def _swiglu_kernel(gu_ptr, y_ptr, I, W, stride_gu, stride_y, BLOCK_I: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_I + tl.arange(0, BLOCK_I)
    real = cols < I
    g = tl.load(gu_ptr + row * stride_gu + cols, mask=real, other=0.0).to(tl.float32)
    u = tl.load(gu_ptr + row * stride_gu + I + cols, mask=real, other=0.0).to(tl.float32)
    y = g / (1.0 + tl.exp(-g)) * u  # 0 past I: silu(0) * 0
    tl.store(y_ptr + row * stride_y + cols, y.to(y_ptr.dtype.element_ty), mask=cols < W)


def swiglu_triton(gate_up: torch.Tensor, out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Triton SwiGLU; see ``mythos_rt.ops.ffn.swiglu_torch`` for the contract (an ``out``
    wider than I gets zeros past I)."""
    I = swiglu_half_width(gate_up, out)
    gu = as_rows("gate_up", gate_up, 2 * I)
    if out is None:
        out = gate_up.new_empty(*gate_up.shape[:-1], I)
    W = out.shape[-1]
    y = as_rows("out", out, W)
    n_rows = gu.shape[0]
    if n_rows and W:
        block_i = min(1024, triton.next_power_of_2(W))
        grid = (n_rows, triton.cdiv(W, block_i))
        _swiglu_kernel[grid](gu, y, I, W, gu.stride(0), y.stride(0), BLOCK_I=block_i,
                             num_warps=4 if block_i <= 512 else 8)
    return out

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

from ._rowwise import as_rows


@triton.jit
def _swiglu_kernel(gu_ptr, y_ptr, I, stride_gu, stride_y, BLOCK_I: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_I + tl.arange(0, BLOCK_I)
    mask = cols < I
    g = tl.load(gu_ptr + row * stride_gu + cols, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(gu_ptr + row * stride_gu + I + cols, mask=mask, other=0.0).to(tl.float32)
    y = g / (1.0 + tl.exp(-g)) * u
    tl.store(y_ptr + row * stride_y + cols, y.to(y_ptr.dtype.element_ty), mask=mask)


def swiglu_triton(gate_up: torch.Tensor, out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Triton SwiGLU; see ``mythos_rt.ops.ffn.swiglu_torch`` for the contract."""
    two_i = gate_up.shape[-1]
    if two_i % 2:
        raise ValueError(f"swiglu: last dim must be even (gate|up), got {two_i}")
    I = two_i // 2
    gu = as_rows("gate_up", gate_up, two_i)
    if out is None:
        out = gate_up.new_empty(*gate_up.shape[:-1], I)
    if tuple(out.shape) != tuple(gate_up.shape[:-1]) + (I,):
        raise ValueError(f"swiglu: out shape {tuple(out.shape)}, expected "
                         f"{tuple(gate_up.shape[:-1]) + (I,)}")
    y = as_rows("out", out, I)
    n_rows = gu.shape[0]
    if n_rows and I:
        block_i = min(1024, triton.next_power_of_2(I))
        grid = (n_rows, triton.cdiv(I, block_i))
        _swiglu_kernel[grid](gu, y, I, gu.stride(0), y.stride(0), BLOCK_I=block_i,
                             num_warps=4 if block_i <= 512 else 8)
    return out

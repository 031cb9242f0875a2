"""Host-side helpers of the row-wise Triton kernels (rmsnorm, swiglu, recurrent_step)."""

from __future__ import annotations

import torch
import triton

from . import interpreted

SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def as_rows(name: str, t: torch.Tensor, width: int) -> torch.Tensor:
    """View ``t`` (..., width) as (rows, width) without copying; its last dim must be dense.

    A 2-D tensor may have any row stride (e.g. a slice of a bigger buffer); higher ranks
    must be viewable as 2-D. Never copies: a copy would silently drop writes to ``out=``.
    """
    if t.shape[-1] != width:
        raise ValueError(f"{name}: last dim is {t.shape[-1]}, expected {width}")
    if t.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"{name}: dtype {t.dtype} not supported (fp32/fp16/bf16)")
    if t.dim() == 2 and (t.stride(1) == 1 or width == 1):
        return t
    try:
        return t.view(-1, width)
    except RuntimeError:
        raise ValueError(f"{name}: needs a dense last dim viewable as (-1, {width}); "
                         f"got shape {tuple(t.shape)} strides {t.stride()}") from None


def row_config(n_cols: int, n_rows: int) -> tuple[int, int, int]:
    """(BLOCK_D, BLOCK_M, num_warps) for kernels that keep whole rows in registers.

    BLOCK_D covers a row (next power of two); BLOCK_M packs several short rows into one
    program when there are many rows, keeping <= 8K values of a tile per program.
    """
    block_d = triton.next_power_of_2(max(n_cols, 16))
    block_m = 1
    if n_rows >= 1024:  # enough programs to fill the machine even when packing rows
        block_m = max(1, min(8, 8192 // block_d))
    block_m = interpreter_rows(block_m, n_rows)
    num_warps = max(4, min(16, block_m * block_d // 512))  # ~16 fp32 per thread per tile
    return block_d, block_m, num_warps


def interpreter_rows(block_m: int, n_rows: int) -> int:
    """Under TRITON_INTERPRET the cost is per program, not per element: pack up to 16 rows
    per program there (the kernels are row-count agnostic; GPU configs are unchanged)."""
    if interpreted():
        return max(block_m, min(16, triton.next_power_of_2(max(n_rows, 1))))
    return block_m

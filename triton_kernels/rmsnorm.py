"""RMSNorm with an optional fused residual add (Triton).

One program normalizes BLOCK_M whole rows held in registers (BLOCK_D = next power of two
of D, masked), so every element is read once and written once. float32 accumulation in
every storage dtype. ``rmsnorm_triton`` has the signature of
``mythos_rt.ops.norm.rmsnorm_torch``.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from ._rowwise import as_rows, row_config


@triton.jit(do_not_specialize=["n_rows"])
def _rmsnorm_kernel(x_ptr, r_ptr, w_ptr, y_ptr, s_ptr, n_rows, D, eps,
                    stride_x, stride_r, stride_y, stride_s,
                    HAS_RESIDUAL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    pid = tl.program_id(0)
    rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_D)
    rmask = rows < n_rows
    cmask = cols < D
    mask = rmask[:, None] & cmask[None, :]
    rows64 = rows.to(tl.int64)[:, None]
    x = tl.load(x_ptr + rows64 * stride_x + cols[None, :], mask=mask, other=0.0)
    if HAS_RESIDUAL:
        r = tl.load(r_ptr + rows64 * stride_r + cols[None, :], mask=mask, other=0.0)
        s = (x.to(tl.float32) + r.to(tl.float32)).to(x.dtype)
        tl.store(s_ptr + rows64 * stride_s + cols[None, :], s, mask=mask)
        sf = s.to(tl.float32)
    else:
        sf = x.to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(sf * sf, axis=1) / D + eps)
    w = tl.load(w_ptr + cols, mask=cmask, other=0.0).to(tl.float32)
    y = sf * rstd[:, None] * w[None, :]
    tl.store(y_ptr + rows64 * stride_y + cols[None, :], y.to(y_ptr.dtype.element_ty), mask=mask)


def rmsnorm_triton(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6,
                   residual: Optional[torch.Tensor] = None, out: Optional[torch.Tensor] = None,
                   residual_out: Optional[torch.Tensor] = None):
    """Triton RMSNorm; see ``mythos_rt.ops.norm.rmsnorm_torch`` for the contract.

    ``out`` / ``residual_out`` may alias ``x`` / ``residual`` (each program reads its rows
    completely before writing them). Allocates only the outputs that are not given.
    """
    D = x.shape[-1]
    if weight.numel() != D:
        raise ValueError(f"rmsnorm: weight has {weight.numel()} elements, expected {D}")
    x2 = as_rows("x", x, D)
    if out is None:
        out = torch.empty_like(x)
    y2 = as_rows("out", out, D)
    has_res = residual is not None
    if has_res:
        if residual.shape != x.shape:
            raise ValueError(f"rmsnorm: residual shape {tuple(residual.shape)} != "
                             f"x shape {tuple(x.shape)}")
        r2 = as_rows("residual", residual, D)
        if residual_out is None:
            residual_out = torch.empty_like(x)
        s2 = as_rows("residual_out", residual_out, D)
    else:
        r2 = s2 = x2  # unused (HAS_RESIDUAL=False)
    n_rows = x2.shape[0]
    if n_rows:
        block_d, block_m, num_warps = row_config(D, n_rows)
        grid = (triton.cdiv(n_rows, block_m),)
        _rmsnorm_kernel[grid](x2, r2, weight, y2, s2, n_rows, D, float(eps),
                              x2.stride(0), r2.stride(0), y2.stride(0), s2.stride(0),
                              HAS_RESIDUAL=has_res, BLOCK_M=block_m, BLOCK_D=block_d,
                              num_warps=num_warps)
    return (out, residual_out) if has_res else out

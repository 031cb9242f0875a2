"""Lean CPU RMSNorm (optionally with the residual add).

Same contracts as ``mythos_rt.ops.norm``: one ``torch.add`` for the residual, and for a
single row the RMS read on the host as one norm (``inv_rms``), instead of the
reference's dtype round trips and five-call RMS; with the compiled kernels
(``mythos_rt.cpu.native``) rows into a given ``out`` are one ``rmsnorm_rows`` call
(``rmsnorm_rows_bf16`` for bf16 rows, rounded as the torch implementation rounds). Other
dtypes, and bf16 without the kernels, run the torch implementations.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F

from ..ops.norm import rmsnorm_torch
from . import native

__all__ = ["ZERO", "inv_rms", "rms_normalize", "rmsnorm_cpu", "bind_rmsnorm_cpu"]

ZERO = torch.zeros(())  # the ignored ``input`` of addmm/addcmul calls that only scale


def inv_rms(x: torch.Tensor, eps: float):
    """1/sqrt(mean(x²) + eps) per row of x (N, D): a float for one row (its norm read on
    the host: two calls instead of the five of a tensor RMS), else an (N, 1) tensor."""
    if x.shape[0] == 1:
        ss = float(torch.linalg.vector_norm(x)) ** 2
        return 1.0 / math.sqrt(ss / x.shape[1] + eps)
    return x.square().mean(-1, keepdim=True).add_(eps).rsqrt_()


def rms_normalize(s: torch.Tensor, weight: torch.Tensor, eps: float,
                  out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``s * rsqrt(mean(s²) + eps) * weight`` (float32), into ``out`` when given."""
    r = inv_rms(s, eps)  # before out is written: out may alias s
    if isinstance(r, float):  # one row: 0 + r·s·w in one call
        return (torch.addcmul(ZERO, s, weight, value=r) if out is None
                else torch.addcmul(ZERO, s, weight, value=r, out=out))
    y = torch.mul(s, weight) if out is None else torch.mul(s, weight, out=out)
    return y.mul_(r)


def rmsnorm_cpu(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6,
                residual: Optional[torch.Tensor] = None, out: Optional[torch.Tensor] = None,
                residual_out: Optional[torch.Tensor] = None):
    """``rmsnorm`` (see ``ops.norm.rmsnorm_torch``)."""
    if x.dim() == 2 and out is not None:
        s = residual_out if residual is None or residual_out is not None else torch.empty_like(x)
        launch = bind_rmsnorm_cpu(x, weight, eps, residual, out, s)
        if launch is not None:
            return launch()
    if x.dtype != torch.float32 or weight.dtype != torch.float32:
        return rmsnorm_torch(x, weight, eps, residual, out, residual_out)
    s = x
    if residual is not None:
        s = (torch.add(x, residual) if residual_out is None
             else torch.add(x, residual, out=residual_out))
    if s.dim() != 2:
        y = F.rms_norm(s, (x.shape[-1],), weight, eps)
        y = y if out is None else out.copy_(y)
    else:
        y = rms_normalize(s, weight, eps, out)
    return y if residual is None else (y, s)


def bind_rmsnorm_cpu(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6,
                     residual: Optional[torch.Tensor] = None, out: Optional[torch.Tensor] = None,
                     residual_out: Optional[torch.Tensor] = None):
    """``rmsnorm_cpu`` of (N, D) rows as a prebound call of the compiled kernel, or None
    where that does not apply (no kernel, rows not contiguous float32 or bf16 (the weight
    then any float dtype, widened once here), no ``out``, or a residual without
    ``residual_out``)."""
    lib = native.library()
    rows = x.dtype
    if (lib is None or x.dim() != 2 or out is None or rows not in (torch.float32, torch.bfloat16)
            or (residual is not None and residual_out is None)
            or any(t is not None and t.dtype != rows for t in (residual, out, residual_out))
            or (rows == torch.float32 and weight.dtype != torch.float32)
            or not native.contiguous(x, residual, out, residual_out)):
        return None
    weight = weight.reshape(-1).to(torch.float32).contiguous()  # the model's own if float32
    kernel = lib.rmsnorm_rows if rows == torch.float32 else lib.rmsnorm_rows_bf16
    call = native.prebound(kernel, x.data_ptr(), native.address(residual),
                           weight.data_ptr(), eps, x.shape[0], x.shape[1], out.data_ptr(),
                           native.address(residual_out),
                           keep=(x, residual, weight, out, residual_out))

    def launch():
        call()
        return out if residual is None else (out, residual_out)
    return launch

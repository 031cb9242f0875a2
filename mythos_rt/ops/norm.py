"""RMSNorm, optionally fused with the residual add.

The torch implementation (composite PyTorch, the per-op reference, runs anywhere) plus
the registrations of the Triton kernel (``mythos_rt.triton_kernels.rmsnorm``) and the
cpu one (``mythos_rt.cpu.norm``). Every backend takes identical arguments and accumulates
in float32 whatever the storage dtype (fp32 / fp16 / bf16); results are cast back to the
storage dtype.

The torch backend allocates temporaries (fine under CUDA-graph capture, which gives it a
private pool); the Triton backend allocates nothing when ``out=`` (and ``residual_out=``)
are given. Neither synchronizes with the host.
"""

from __future__ import annotations

from typing import Optional

import torch

from .registry import CPU_DTYPES, register

__all__ = ["NORM_EPS", "rmsnorm", "rmsnorm_torch"]

# The epsilon of every RMSNorm of an OpenMythos model (the reference's RMSNorm default).
NORM_EPS = 1e-6


def _check_last_dim(name: str, x: torch.Tensor, dim: int) -> None:
    if x.shape[-1] != dim:
        raise ValueError(f"{name}: last dim {x.shape[-1]} != {dim}")


def rmsnorm_torch(x: torch.Tensor, weight: torch.Tensor, eps: float = NORM_EPS,
                  residual: Optional[torch.Tensor] = None, out: Optional[torch.Tensor] = None,
                  residual_out: Optional[torch.Tensor] = None):
    """RMSNorm ``y = s * rsqrt(mean(s²) + eps) * weight`` with ``s = x (+ residual)``.

    Parameters
    ----------
    x : (..., D) fp32 / fp16 / bf16.
    weight : (D,) any float dtype.
    eps : added to mean(s²).
    residual : optional (..., D), same shape and dtype as x. When given, ``s = x + residual``
        (rounded to the storage dtype) is both returned and normalized — the fused
        pre-norm residual add.
    out : optional (..., D) buffer of x's dtype for y (may alias x).
    residual_out : optional (..., D) buffer for s (may alias x or residual).

    Returns
    -------
    y (..., D) in x's dtype, or ``(y, s)`` when ``residual`` is given.
    Sums of squares are accumulated in float32.
    """
    D = x.shape[-1]
    _check_last_dim("weight", weight.reshape(-1), D)
    if residual is not None:
        _check_last_dim("residual", residual, D)
        s = (x.float() + residual.float()).to(x.dtype)
        if residual_out is not None:
            residual_out.copy_(s)
            s = residual_out
    else:
        s = x
    sf = s.float()
    y = sf * torch.rsqrt(sf.pow(2).mean(-1, keepdim=True) + eps) * weight.float()
    if out is None:
        out = y.to(x.dtype)
    else:
        out.copy_(y)
    return out if residual is None else (out, s)


def rmsnorm(x, weight, eps=NORM_EPS, residual=None, out=None, residual_out=None, backend="auto"):
    """Dispatch ``rmsnorm`` to the backend chosen for x's device (see ``rmsnorm_torch``)."""
    from .registry import select
    return select("rmsnorm", x.device, backend).fn(x, weight, eps, residual, out, residual_out)


register("rmsnorm", "torch", "mythos_rt.ops.norm:rmsnorm_torch")
register("rmsnorm", "triton", "mythos_rt.triton_kernels.rmsnorm:rmsnorm_triton")
register("rmsnorm", "cpu", "mythos_rt.cpu.norm:rmsnorm_cpu",
         bind="mythos_rt.cpu.norm:bind_rmsnorm_cpu", dtypes=CPU_DTYPES)

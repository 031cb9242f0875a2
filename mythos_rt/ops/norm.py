"""RMSNorm (optionally fused with the residual add) and the SwiGLU activation.

Torch implementations (composite PyTorch, the per-op references, run anywhere) plus the
registrations of their Triton kernels in ``mythos_rt.triton_kernels.{rmsnorm,swiglu}``.
Both backends take identical arguments and accumulate in float32 whatever the storage
dtype (fp32 / fp16 / bf16); results are cast back to the storage dtype.

The torch backend allocates temporaries (fine under CUDA-graph capture, which gives it a
private pool); the Triton backend allocates nothing when ``out=`` (and ``residual_out=``)
are given. Neither synchronizes with the host.
"""

from __future__ import annotations

from typing import Optional

import torch

from .registry import register

__all__ = ["rmsnorm", "swiglu", "rmsnorm_torch", "swiglu_torch"]


def _check_last_dim(name: str, x: torch.Tensor, dim: int) -> None:
    if x.shape[-1] != dim:
        raise ValueError(f"{name}: last dim {x.shape[-1]} != {dim}")


def rmsnorm_torch(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6,
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


def swiglu_torch(gate_up: torch.Tensor, out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """SwiGLU activation ``silu(gate) * up`` of a fused gate/up projection.

    Parameters
    ----------
    gate_up : (..., 2I) = [gate | up] along the last dim, fp32 / fp16 / bf16.
    out : optional (..., I) buffer of gate_up's dtype.

    Returns
    -------
    (..., I) in gate_up's dtype, computed in float32.
    """
    two_i = gate_up.shape[-1]
    if two_i % 2:
        raise ValueError(f"swiglu: last dim must be even (gate|up), got {two_i}")
    g, u = gate_up.float().chunk(2, dim=-1)
    y = torch.nn.functional.silu(g) * u
    if out is None:
        return y.to(gate_up.dtype)
    out.copy_(y)
    return out


def rmsnorm(x, weight, eps=1e-6, residual=None, out=None, residual_out=None, backend="auto"):
    """Dispatch ``rmsnorm`` to the backend chosen for x's device (see ``rmsnorm_torch``)."""
    from .registry import select
    return select("rmsnorm", x.device, backend).fn(x, weight, eps, residual, out, residual_out)


def swiglu(gate_up, out=None, backend="auto"):
    """Dispatch ``swiglu`` to the backend chosen for gate_up's device (see ``swiglu_torch``)."""
    from .registry import select
    return select("swiglu", gate_up.device, backend).fn(gate_up, out)


register("rmsnorm", "torch", "mythos_rt.ops.norm:rmsnorm_torch")
register("rmsnorm", "triton", "mythos_rt.triton_kernels.rmsnorm:rmsnorm_triton")
register("swiglu", "torch", "mythos_rt.ops.norm:swiglu_torch")
register("swiglu", "triton", "mythos_rt.triton_kernels.swiglu:swiglu_triton")
register("rmsnorm", "cpu", "mythos_rt.cpu.norm:rmsnorm_cpu",
         bind="mythos_rt.cpu.norm:bind_rmsnorm_cpu")
register("swiglu", "cpu", "mythos_rt.cpu.norm:swiglu_cpu")

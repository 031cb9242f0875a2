"""Dense SwiGLU FFN of the Prelude and Coda blocks: ``down(silu(gate·x) · up·x)``.

One op so that a backend can run the whole FFN its own way: ``torch`` and ``triton`` are
two matmuls around the ``swiglu`` op's implementation of the same backend (the launches
the lowering made before this op existed), ``cpu`` adds compiled row kernels for decode
(``mythos_rt.cpu.ffn``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch

from .norm import swiglu_torch
from .registry import register

__all__ = ["DenseFFN", "dense_ffn_torch", "dense_ffn_triton"]


@dataclass(frozen=True)
class DenseFFN:
    """The FFN's weights in nn.Linear layout: ``w13`` (2H, D) = [gate; up], ``down`` (D, H)."""
    w13: torch.Tensor
    down: torch.Tensor


def _dense_ffn(swiglu: Callable, x: torch.Tensor, w: DenseFFN, out: Optional[torch.Tensor],
               gate_up: Optional[torch.Tensor], act: Optional[torch.Tensor]) -> torch.Tensor:
    gu = torch.matmul(x, w.w13.t()) if gate_up is None else torch.matmul(x, w.w13.t(), out=gate_up)
    a = swiglu(gu) if act is None else swiglu(gu, out=act)
    return torch.matmul(a, w.down.t()) if out is None else torch.matmul(a, w.down.t(), out=out)


def dense_ffn_torch(x: torch.Tensor, w: DenseFFN, out: Optional[torch.Tensor] = None,
                    gate_up: Optional[torch.Tensor] = None,
                    act: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Dense SwiGLU FFN (torch backend).

    Parameters
    ----------
    x : (N, D). w : DenseFFN of x's dtype.
    out : optional (N, D) result buffer. gate_up : optional (N, 2H) and act : optional
        (N, H) buffers for the intermediates (so a plan step allocates nothing).

    Returns
    -------
    (N, D) ``down(silu(x·gateᵀ) · x·upᵀ)``.
    """
    return _dense_ffn(swiglu_torch, x, w, out, gate_up, act)


def dense_ffn_triton(x: torch.Tensor, w: DenseFFN, out: Optional[torch.Tensor] = None,
                     gate_up: Optional[torch.Tensor] = None,
                     act: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``dense_ffn`` with the Triton SwiGLU kernel between the two matmuls."""
    from ..triton_kernels.swiglu import swiglu_triton
    return _dense_ffn(swiglu_triton, x, w, out, gate_up, act)


register("dense_ffn", "torch", "mythos_rt.ops.ffn:dense_ffn_torch")
register("dense_ffn", "triton", "mythos_rt.ops.ffn:dense_ffn_triton")
register("dense_ffn", "cpu", "mythos_rt.cpu.ffn:dense_ffn_cpu",
         prepare="mythos_rt.cpu.ffn:prepare_dense_ffn", bind="mythos_rt.cpu.ffn:bind_dense_ffn_cpu")

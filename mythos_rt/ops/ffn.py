"""The SwiGLU FFN family: the ``swiglu`` activation and the dense FFN of the Prelude and
Coda blocks, ``down(silu(gate·x) · up·x)``.

``dense_ffn`` is one op so that a backend can run the whole FFN its own way: ``torch`` and
``triton`` are two matmuls around the ``swiglu`` op's implementation of the same backend,
``cpu`` adds compiled row kernels for decode (``mythos_rt.cpu.ffn``). Every backend
computes in float32 whatever the storage dtype and casts back.

The ``triton`` backend pads the hidden size to a multiple of ``HIDDEN_ALIGN`` when it
prepares the weights (``align_hidden``): mythos_1b's 2730 makes every ``gate_up`` / ``act``
row start off a 16-byte boundary, which costs cuBLAS and vectorized loads their fast
paths. The lowering sizes those buffers from the prepared weights (``DenseFFN.hidden``)
and keeps the model's weights as views of the padded ones (``DenseFFN.unpadded``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Mapping, Optional

import torch

from .registry import CPU_DTYPES, register

__all__ = ["DenseFFN", "HIDDEN_ALIGN", "align_hidden", "swiglu", "swiglu_torch", "dense_ffn_torch",
           "dense_ffn_triton"]

# The Triton backend's hidden-size multiple: rows of 64 elements start on 128-byte
# boundaries in 16-bit dtypes (256 in float32).
HIDDEN_ALIGN = 64


def swiglu_torch(gate_up: torch.Tensor, out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """SwiGLU activation ``silu(gate) * up`` of a fused gate/up projection.

    Parameters
    ----------
    gate_up : (..., 2I) = [gate | up] along the last dim, fp32 / fp16 / bf16.
    out : optional (..., I') buffer of gate_up's dtype, I' >= I; columns past I are set
        to zero (the ``act`` of an FFN padded by ``align_hidden``).

    Returns
    -------
    ``out``, or a new (..., I) tensor in gate_up's dtype; computed in float32.
    """
    I = swiglu_half_width(gate_up, out)
    g, u = gate_up.float().chunk(2, dim=-1)
    y = torch.nn.functional.silu(g) * u
    if out is None:
        return y.to(gate_up.dtype)
    out[..., :I].copy_(y)
    out[..., I:].zero_()
    return out


def swiglu_half_width(gate_up: torch.Tensor, out: Optional[torch.Tensor]) -> int:
    """I of a (..., 2I) ``gate_up``, checked against an ``out`` (..., I' >= I)."""
    two_i = gate_up.shape[-1]
    if two_i % 2:
        raise ValueError(f"swiglu: last dim must be even (gate|up), got {two_i}")
    I = two_i // 2
    if out is not None and (tuple(out.shape[:-1]) != tuple(gate_up.shape[:-1])
                            or out.shape[-1] < I):
        raise ValueError(f"swiglu: out shape {tuple(out.shape)}, expected "
                         f"{tuple(gate_up.shape[:-1]) + (I,)} or wider")
    return I


def swiglu(gate_up, out=None, backend="auto"):
    """Dispatch ``swiglu`` to the backend chosen for gate_up's device (see ``swiglu_torch``)."""
    from .registry import select
    return select("swiglu", gate_up.device, backend).fn(gate_up, out)


@dataclass(frozen=True)
class DenseFFN:
    """The FFN's weights in nn.Linear layout: ``w13`` (2H, D) = [gate; up], ``down`` (D, H).

    ``width``: set by ``align_hidden`` on padded weights, the hidden columns that hold the
    model's FFN (``w13`` is then [gate; up; zero rows], ``down`` [down | zero columns]);
    None when the weights are the model's own."""
    w13: torch.Tensor
    down: torch.Tensor
    width: Optional[int] = None

    @classmethod
    def build(cls, w: Mapping[str, torch.Tensor], cfg) -> "DenseFFN":
        """The one builder (``lower`` and ``lower.op_args``): ``w`` maps the IR op's weight
        roles w13 (gate and up fused by the ``pack_experts`` pass) and down to tensors."""
        return cls(w13=w["w13"], down=w["down"])

    @property
    def hidden(self) -> int:
        """The hidden size H: the width of the ``act`` intermediate (``gate_up``: 2H)."""
        return self.down.shape[1]

    def unpadded(self) -> "DenseFFN":
        """The model's FFN: for padded weights, views of them (no copy), so a plan that
        holds the padded weights need not keep the originals too."""
        if self.width is None:
            return self
        return DenseFFN(w13=self.w13[:2 * self.width], down=self.down[:, :self.width])


def align_hidden(w: DenseFFN, multiple: int = HIDDEN_ALIGN) -> DenseFFN:
    """The Triton backend's prepare hook: the same FFN with its hidden size padded to a
    multiple of ``multiple``, exactly. The zero rows follow [gate; up], so the model's
    weights stay views of the padded ones (``DenseFFN.unpadded``); ``swiglu`` reads gate
    and up from the first 2H columns of ``gate_up`` and writes zeros in ``act``'s padding,
    whose columns of ``down`` are zero, so the result is the unpadded FFN's up to the
    order of the sums. ``w`` itself when aligned."""
    D, H = w.down.shape
    padded = -(-H // multiple) * multiple
    if padded == H:
        return w
    w13 = w.w13.new_zeros(2 * padded, D)
    w13[:2 * H] = w.w13
    down = w.down.new_zeros(D, padded)
    down[:, :H] = w.down
    return DenseFFN(w13=w13, down=down, width=H)


def _dense_ffn(swiglu: Callable, x: torch.Tensor, w: DenseFFN, out: Optional[torch.Tensor],
               gate_up: Optional[torch.Tensor], act: Optional[torch.Tensor]) -> torch.Tensor:
    gu = torch.matmul(x, w.w13.t()) if gate_up is None else torch.matmul(x, w.w13.t(), out=gate_up)
    if act is None:
        act = gu.new_empty(*gu.shape[:-1], w.hidden)
    a = swiglu(gu if w.width is None else gu[..., :2 * w.width], out=act)
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
    """``dense_ffn`` with the Triton SwiGLU kernel between the two matmuls (on the weights
    as given: the lowering passes them through ``align_hidden``)."""
    from ..triton_kernels.swiglu import swiglu_triton
    return _dense_ffn(swiglu_triton, x, w, out, gate_up, act)


register("swiglu", "torch", "mythos_rt.ops.ffn:swiglu_torch")
register("swiglu", "triton", "mythos_rt.triton_kernels.swiglu:swiglu_triton")
register("swiglu", "cpu", "mythos_rt.cpu.ffn:swiglu_cpu", dtypes=CPU_DTYPES)
register("dense_ffn", "torch", "mythos_rt.ops.ffn:dense_ffn_torch")
register("dense_ffn", "triton", "mythos_rt.ops.ffn:dense_ffn_triton",
         prepare="mythos_rt.ops.ffn:align_hidden")
register("dense_ffn", "cpu", "mythos_rt.cpu.ffn:dense_ffn_cpu",
         prepare="mythos_rt.cpu.ffn:prepare_dense_ffn", bind="mythos_rt.cpu.ffn:bind_dense_ffn_cpu",
         dtypes=CPU_DTYPES)

"""The output head, ``logits = x · Wᵀ``: the vocabulary projection as one op, so that a
backend can stream its weight its own way (the cpu backend's row kernels at decode,
``mythos_rt.cpu.head``). On a GPU it is one matmul (cuBLAS, through torch) for every
backend: Triton has no kernel of its own for it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Optional

import torch

from .registry import CPU_DTYPES, register

__all__ = ["HeadWeights", "head_torch"]


@dataclass(frozen=True)
class HeadWeights:
    """The head's weight ``w`` (vocab, D) in nn.Linear layout (a vocabulary shard's rows
    under tensor parallelism)."""
    w: torch.Tensor

    @classmethod
    def build(cls, w: Mapping[str, torch.Tensor], cfg) -> "HeadWeights":
        """The one builder (``lower`` and ``lower.op_args``): the IR op's weight role w."""
        return cls(w=w["w"])


def head_torch(x: torch.Tensor, w: HeadWeights, out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Logits (N, vocab) of rows x (N, D), in x's dtype (into ``out`` when given)."""
    return torch.matmul(x, w.w.t()) if out is None else torch.matmul(x, w.w.t(), out=out)


register("head", "torch", "mythos_rt.ops.head:head_torch")
register("head", "triton", "mythos_rt.ops.head:head_torch")
register("head", "cpu", "mythos_rt.cpu.head:head_cpu", prepare="mythos_rt.cpu.head:prepare_head",
         bind="mythos_rt.cpu.head:bind_head_cpu", dtypes=CPU_DTYPES)

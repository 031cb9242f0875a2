"""Values derived once from a runtime's fixed tensors, for as long as the tensor lives.

The cpu backend's ops are plain functions of their arguments; what they would otherwise
rebuild on every decode step from buffers that never change (the complex RoPE table of
the cos/sin tables, a cache's row view, the ACT state's one-row views) costs a PyTorch
call each time. ``per_tensor`` computes it on first use and forgets it when the tensor
is freed (so a recycled ``id`` can never return a stale value).
"""

from __future__ import annotations

import weakref
from typing import Callable, TypeVar

import torch

T = TypeVar("T")
_MEMO: dict[tuple[str, int], object] = {}


def per_tensor(kind: str, t: torch.Tensor, make: Callable[[torch.Tensor], T]) -> T:
    """``make(t)``, computed once per live tensor ``t`` and kind."""
    key = (kind, id(t))
    hit = _MEMO.get(key)
    if hit is None:
        hit = _MEMO[key] = make(t)
        weakref.finalize(t, _MEMO.pop, key, None)
    return hit

"""Communication ops of a tensor-parallel plan, on torch.distributed's default group.

A sharded graph (``mythos_rt.parallel``) carries them as ordinary IR ops and plan steps:

* ``all_reduce(x)``: sum ``x`` (N, D) over the ranks, in place. After every output
  projection whose input was split (attention heads, FFN columns, the experts, the
  vocabulary rows of the embedding), each rank holds a partial sum of the full result.
* ``all_gather(x, out, scratch)``: each rank's logits over its vocabulary rows, (N, Vp)
  (every rank holds ``Vp`` rows, the last rank's padded with zero rows), gathered into
  ``out`` (N, V), identical on every rank. ``scratch`` holds (W·N_max·Vp) elements,
  allocated once (``gather_scratch``), so a step allocates nothing.

One implementation (torch.distributed: NCCL on GPUs, where collectives are
CUDA-graph-capturable, gloo on CPUs) serves every backend, so any backend choice
lowers a sharded graph. Collectives run on the default process group, which
``mythos_rt.parallel.setup`` creates with a timeout: a dead or missing rank is an error
on the others, never a hang.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from ..errors import clip
from .registry import BACKENDS, register

__all__ = ["CollectiveError", "all_reduce", "all_gather", "gather_scratch"]


class CollectiveError(RuntimeError):
    """A collective failed: another rank died, left or did not answer within the timeout."""


def _failed(what: str, exc: BaseException) -> CollectiveError:
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return CollectiveError(f"{what} on rank {dist.get_rank()} of {dist.get_world_size()} "
                           f"failed: another rank died, left or timed out ({clip(first, 160)})")


def all_reduce(x: torch.Tensor) -> torch.Tensor:
    """Sum ``x`` over every rank, in place (x must be contiguous)."""
    try:
        dist.all_reduce(x)
    except (RuntimeError, ValueError) as exc:  # DistBackendError is a RuntimeError
        raise _failed("all_reduce", exc) from None
    return x


def gather_scratch(world: int, max_rows: int, cols: int, dtype: torch.dtype,
                   device) -> torch.Tensor:
    """The flat buffer ``all_gather`` collects the ranks' (N, cols) blocks into."""
    return torch.empty(world * max_rows * cols, dtype=dtype, device=device)


def all_gather(x: torch.Tensor, out: torch.Tensor, scratch: torch.Tensor) -> torch.Tensor:
    """Concatenate every rank's ``x`` (N, Vp) along columns, keep the first V = out's width.

    Rank r's block lands in columns [r·Vp, (r+1)·Vp) of the concatenation.
    """
    N, Vp = x.shape
    W, V = dist.get_world_size(), out.shape[1]
    blocks = scratch[:W * N * Vp].view(W, N, Vp)
    try:
        dist.all_gather(list(blocks.unbind(0)), x)
    except (RuntimeError, ValueError) as exc:
        raise _failed("all_gather", exc) from None
    for r in range(W):  # column copies: nothing is allocated
        width = min(Vp, V - r * Vp)
        if width > 0:
            out[:, r * Vp:r * Vp + width].copy_(blocks[r, :, :width])
    return out


for _backend in BACKENDS:
    register("all_reduce", _backend, "mythos_rt.ops.comm:all_reduce")
    register("all_gather", _backend, "mythos_rt.ops.comm:all_gather")

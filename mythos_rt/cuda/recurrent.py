"""CUDA recurrent step (``mythos_rt._C``, or NVRTC-specialized kernels): the ``cuda``
backend of ``loop_prologue`` / ``loop_epilogue``. Contracts and math:
``mythos_rt.ops.recurrent.loop_prologue_torch`` / ``loop_epilogue_torch``.

Kernels: one warp per row (csrc/include/mythos_rt/recurrent_step.cuh). Given the
``SpecializedLoop`` of the prepare hook (``mythos_rt.cuda.jit.prepare_loop``, a
compile-time step) its NVRTC-compiled kernels run; given plain ``LoopParams``, or where
no kernels were compiled or the tensors' alignment does not fit them, the AOT kernels
of ``_C`` run.
Nothing here allocates or synchronizes: both ops are CUDA-graph capturable.
"""

from __future__ import annotations

from typing import Optional

import torch

from mythos_rt.ops.recurrent import ACTState, LoopParams, check_step_args

from .jit import SpecializedLoop
from ._ext import _C, check_cuda, check_dtype, dtype_code, ptr, stream

__all__ = ["loop_prologue_cuda", "loop_epilogue_cuda"]

_WEIGHTS = ("norm_w", "lora_down", "lora_B", "lora_scale", "inj_B", "halt_w", "halt_b")


def _check_params(params: LoopParams, dtype: torch.dtype, device: torch.device,
                  names=_WEIGHTS) -> None:
    """The kernels read the weights in the activations' dtype (A in float32)."""
    for name in names:
        t = getattr(params, name)
        check_cuda(device, **{f"params.{name}": t})
        if t.dtype != dtype:
            raise TypeError(f"params.{name} is {t.dtype} but the activations are {dtype}: "
                            f"use LoopParams.to(dtype={dtype})")
    check_cuda(device, **{"params.A": params.A})


def _unpack(params: LoopParams | SpecializedLoop):
    """(LoopParams, specialized kernels or None)."""
    if isinstance(params, SpecializedLoop):
        return params.params, params.kernels
    return params, None


def loop_prologue_cuda(h: torch.Tensor, e: torch.Tensor, params: LoopParams | SpecializedLoop,
                       t: int, out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """CUDA ``loop_prologue`` (see ``mythos_rt.ops.recurrent.loop_prologue_torch``).

    h, e : (N, D) float32/float16/bfloat16, same dtype, unit last stride.
    params : LoopParams whose weights are in h's dtype, on h's device (or its
        ``SpecializedLoop``).
    t : loop index. out : optional (N, D) buffer of h's dtype.
    Returns combined (N, D) in h's dtype (float32 math).
    """
    params, kern = _unpack(params)
    check_step_args(h, e, params, out=out)
    code = dtype_code("h", h)
    check_cuda(h.device, e=e, out=out)
    _check_params(params, h.dtype, h.device, ("norm_w",))
    if out is None:
        out = torch.empty_like(h)
    else:
        check_dtype("out", out, h.dtype)
    N, D = h.shape
    if N == 0:
        return out
    if kern is not None and kern.prologue(h, e, params, int(t), out):
        return out
    _C.loop_prologue(h=ptr(h), e=ptr(e), norm_w=ptr(params.norm_w), out=ptr(out), n_rows=N,
                     dim=D, stride_h=h.stride(0), stride_e=e.stride(0),
                     stride_out=out.stride(0), t=int(t), loop_dim=params.loop_dim,
                     eps=float(params.eps), dtype=code, stream=stream(h.device))
    return out


def loop_epilogue_cuda(block_out: torch.Tensor, h: torch.Tensor, e: torch.Tensor,
                       params: LoopParams | SpecializedLoop, t: int, state: ACTState,
                       next_combined: Optional[torch.Tensor] = None) -> None:
    """CUDA ``loop_epilogue``, one launch (see ``mythos_rt.ops.recurrent.loop_epilogue_torch``).

    block_out, h, e : (N, D), same dtype, unit last stride; h updated in place.
    params : LoopParams with weights in h's dtype (A float32) on h's device (or its
        ``SpecializedLoop``).
    state : ACTState (h_out in h's dtype, cum_p float32, halted bool, n_running int32).
    next_combined : optional (N, D) buffer for the next loop's prologue; may alias block_out.
    """
    params, kern = _unpack(params)
    check_step_args(h, e, params, block_out=block_out, state=state, out=next_combined)
    code = dtype_code("h", h)
    check_cuda(h.device, block_out=block_out, e=e, next_combined=next_combined,
               h_out=state.h_out, cum_p=state.cum_p, halted=state.halted,
               n_running=state.n_running)
    _check_params(params, h.dtype, h.device)
    check_dtype("ACTState.h_out", state.h_out, h.dtype)
    check_dtype("ACTState.cum_p", state.cum_p, torch.float32)
    check_dtype("ACTState.halted", state.halted, torch.bool)
    check_dtype("ACTState.n_running", state.n_running, torch.int32)
    check_dtype("params.A", params.A, torch.float32)
    if next_combined is not None:
        check_dtype("next_combined", next_combined, h.dtype)
    if state.h_out.stride(1) != 1:
        raise ValueError("ACTState.h_out needs a contiguous last dim")
    N, D = h.shape
    if N == 0:
        return None
    if kern is not None and kern.epilogue(block_out, h, e, params, int(t), state,
                                          next_combined):
        return None
    nc = next_combined
    _C.loop_epilogue(
        block_out=ptr(block_out), h=ptr(h), e=ptr(e), h_out=ptr(state.h_out),
        cum_p=ptr(state.cum_p), halted=ptr(state.halted), n_running=ptr(state.n_running),
        next=ptr(nc), norm_w=ptr(params.norm_w), lora_down=ptr(params.lora_down),
        lora_B=ptr(params.lora_B), lora_scale=ptr(params.lora_scale), A=ptr(params.A),
        inj_B=ptr(params.inj_B), halt_w=ptr(params.halt_w), halt_b=ptr(params.halt_b),
        n_rows=N, n_max=state.n_max, dim=D, rank=params.rank, max_loops=params.max_loops,
        stride_x=block_out.stride(0), stride_h=h.stride(0), stride_e=e.stride(0),
        stride_out=state.h_out.stride(0), stride_next=nc.stride(0) if nc is not None else 0,
        t=int(t), loop_dim=params.loop_dim, threshold=float(params.threshold),
        eps=float(params.eps), dtype=code, stream=stream(h.device))
    return None

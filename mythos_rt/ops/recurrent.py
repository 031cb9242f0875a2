"""The fused recurrent step: loop prologue and epilogue around the shared block.

Loop ``t`` of the recurrent block (docs/design.md "Reference semantics") becomes

    combined = loop_prologue(h, e, params, t)                    # before the first pass
    for t in range(n_loops):
        block_out = block(combined)                              # attention + MoE
        loop_epilogue(block_out, h, e, params, t, state,        # LoRA + LTI + ACT and the
                      next_combined=combined)                    # next loop's prologue

so exactly one launch sits between two passes of the block. Rows are flattened tokens:
``h``, ``e``, ``block_out`` and ``combined`` are (N, D) with a dense last dim.

* ``loop_prologue``: ``rmsnorm(h + loop_embed(t) + e) * norm_w``; loop_embed puts
  ``sin(t·f_j)`` on channels [0, loop_dim/2) and ``cos(t·f_j)`` on [loop_dim/2, loop_dim),
  ``f_j = 10000^(-2j/loop_dim)``, computed in float32.
* ``loop_epilogue`` (in place, all rows, no host sync)::

      delta = (block_out @ lora_downᵀ * lora_scale[min(t, max_loops-1)]) @ lora_B
      h     = A·h + inj_B·e + block_out + delta
      p     = sigmoid(h·halt_w + halt_b);  running = ~halted
      w     = (cum_p + p >= thr) ? max(1 - cum_p, 0) : p;   w *= running
      h_out += w·h;  cum_p += p·running;  halted |= cum_p >= thr
      n_running = number of rows (of the last ``reset``) not halted

  Everything is accumulated in float32 whatever the storage dtype; ``h`` is stored in
  its dtype and the stored value is what feeds ``p``, ``h_out`` and the next prologue
  (exactly what an unfused pipeline would see).

The torch backend is the per-op reference (composite PyTorch; allocates temporaries but
never synchronizes with the host). The Triton backend (``mythos_rt.triton_kernels.
recurrent_step``) allocates nothing when given its buffers.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Mapping, Optional

import torch

from .norm import NORM_EPS
from .registry import CPU_DTYPES, register

__all__ = ["LoopParams", "ACTState", "loop_prologue", "loop_epilogue",
           "loop_prologue_torch", "loop_epilogue_torch", "loop_embedding"]

# The loop-index embedding's frequency base; the C++ copy (kLoopTheta in
# csrc/include/mythos_rt/recurrent_step.cuh) is checked against it by tests/csrc.
LOOP_THETA = 10000.0


def lti_decay(log_A: torch.Tensor, log_dt: torch.Tensor) -> torch.Tensor:
    """The LTI decay A = exp(-exp(clamp(log_dt + log_A, -20, 20))), in float32."""
    return torch.exp(-torch.exp((log_dt.float() + log_A.float()).clamp(-20, 20)))


@dataclass
class LoopParams:
    """Compile-time constants of the recurrent loop (one per model).

    Attributes
    ----------
    norm_w : (D,) weight of the recurrent RMSNorm (``recurrent.norm``).
    lora_down : (r, D) ``recurrent.lora.down.weight``.
    lora_B : (r, D) ``recurrent.lora.B``.
    lora_scale : (max_loops, r) ``recurrent.lora.scale.weight``.
    A : (D,) float32, ``exp(-exp(clamp(log_dt + log_A, -20, 20)))`` precomputed.
    inj_B : (D,) ``recurrent.injection.B``.
    halt_w : (D,) ``recurrent.act.halt.weight`` flattened.
    halt_b : (1,) ``recurrent.act.halt.bias``.
    threshold : ACT threshold (``cfg.act_threshold``).
    max_loops : rows of the LoRA scale table (``cfg.max_loop_iters``); loop indices
        beyond it use the last row.
    loop_dim : channels carrying the loop-index embedding (``cfg.loop_dim``, even).
    eps : RMSNorm epsilon.
    """

    norm_w: torch.Tensor
    lora_down: torch.Tensor
    lora_B: torch.Tensor
    lora_scale: torch.Tensor
    A: torch.Tensor
    inj_B: torch.Tensor
    halt_w: torch.Tensor
    halt_b: torch.Tensor
    threshold: float
    max_loops: int
    loop_dim: int
    eps: float = NORM_EPS

    def __post_init__(self):
        D = self.norm_w.numel()
        r = self.lora_down.shape[0]
        for name, shape in (("norm_w", (D,)), ("lora_down", (r, D)), ("lora_B", (r, D)),
                            ("lora_scale", (self.max_loops, r)), ("A", (D,)),
                            ("inj_B", (D,)), ("halt_w", (D,)), ("halt_b", (1,))):
            got = tuple(getattr(self, name).shape)
            if got != shape:
                raise ValueError(f"LoopParams.{name}: shape {got}, expected {shape}")
        if self.A.dtype != torch.float32:
            raise ValueError(f"LoopParams.A must be float32, got {self.A.dtype}")
        if self.loop_dim < 2 or self.loop_dim % 2 or self.loop_dim > D:
            raise ValueError(f"LoopParams.loop_dim must be even, >= 2 and <= D={D}; "
                             f"got {self.loop_dim}")
        if self.max_loops < 1:
            raise ValueError(f"LoopParams.max_loops must be >= 1, got {self.max_loops}")
        for name in ("norm_w", "lora_down", "lora_B", "lora_scale", "A", "inj_B",
                     "halt_w", "halt_b"):
            if not getattr(self, name).is_contiguous():
                setattr(self, name, getattr(self, name).contiguous())

    @property
    def dim(self) -> int:
        return self.norm_w.numel()

    @property
    def rank(self) -> int:
        return self.lora_down.shape[0]

    @classmethod
    def build(cls, w: Mapping[str, torch.Tensor], cfg) -> "LoopParams":
        """The one builder (``lower`` and ``lower.op_args``): ``w`` maps the loop ops' weight
        roles (this class's tensor fields: the prologue's norm_w, the epilogue's LoRA, LTI
        and ACT weights, ``A`` derived by ``lti_decay``) to tensors; the scalars come from
        ``cfg``."""
        return cls(norm_w=w["norm_w"], lora_down=w["lora_down"], lora_B=w["lora_B"],
                   lora_scale=w["lora_scale"], A=w["A"], inj_B=w["inj_B"],
                   halt_w=w["halt_w"].reshape(-1), halt_b=w["halt_b"].reshape(1),
                   threshold=float(cfg.act_threshold), max_loops=int(cfg.max_loop_iters),
                   loop_dim=int(cfg.loop_dim))


@dataclass
class ACTState:
    """Preallocated ACT buffers of the recurrent loop (device tensors, sized at N_max).

    Attributes
    ----------
    h_out : (N_max, D) storage dtype, the ACT-weighted sum of h.
    cum_p : (N_max,) float32 cumulative halting probability.
    halted : (N_max,) bool.
    n_running : (1,) int32 on device: rows (of the last ``reset(n)``) not yet halted;
        0 means every position has halted. Maintained by ``loop_epilogue`` without any
        host sync (the Triton kernel decrements it atomically by the rows that halt).
    """

    h_out: torch.Tensor
    cum_p: torch.Tensor
    halted: torch.Tensor
    n_running: torch.Tensor

    @classmethod
    def allocate(cls, n_max: int, dim: int, dtype: torch.dtype,
                 device: torch.device | str) -> "ACTState":
        """Zeroed buffers for up to ``n_max`` rows; ``n_running`` starts at ``n_max``."""
        return cls(h_out=torch.zeros(n_max, dim, dtype=dtype, device=device),
                   cum_p=torch.zeros(n_max, dtype=torch.float32, device=device),
                   halted=torch.zeros(n_max, dtype=torch.bool, device=device),
                   n_running=torch.full((1,), n_max, dtype=torch.int32, device=device))

    @property
    def n_max(self) -> int:
        return self.cum_p.shape[0]

    def reset(self, n: Optional[int] = None) -> "ACTState":
        """Start a new forward over ``n`` rows (default all): zero the first n rows of
        h_out / cum_p / halted in place and set n_running = n. No allocation, no sync."""
        n = self.n_max if n is None else int(n)
        if not 0 <= n <= self.n_max:
            raise ValueError(f"ACTState.reset: n={n} outside [0, {self.n_max}]")
        self.h_out[:n].zero_()
        self.cum_p[:n].zero_()
        self.halted[:n].zero_()
        self.n_running.fill_(n)
        return self


def _check_rows(name: str, t: torch.Tensor, n: int, d: int) -> None:
    if t.dim() != 2 or t.shape[0] != n or t.shape[1] != d:
        raise ValueError(f"{name}: shape {tuple(t.shape)}, expected ({n}, {d})")
    if t.stride(1) != 1:
        raise ValueError(f"{name}: last dim must be contiguous (strides {t.stride()})")


def check_step_args(h, e, params: LoopParams, block_out=None, state: Optional[ACTState] = None,
                    out=None):
    """Validate shapes shared by both backends (host metadata only; no device access)."""
    N, D = h.shape[0] if h.dim() == 2 else -1, params.dim
    _check_rows("h", h, N, D)
    _check_rows("e", e, N, D)
    if e.dtype != h.dtype:
        raise TypeError(f"e dtype {e.dtype} != h dtype {h.dtype}")
    if block_out is not None:
        _check_rows("block_out", block_out, N, D)
        if block_out.dtype != h.dtype:
            raise TypeError(f"block_out dtype {block_out.dtype} != h dtype {h.dtype}")
    if out is not None:
        _check_rows("out", out, N, D)
    if state is not None:
        if state.n_max < N or state.h_out.shape[1] != D:
            raise ValueError(f"ACTState holds ({state.n_max}, {state.h_out.shape[1]}); "
                             f"this step needs ({N}, {D})")


def loop_embedding(t: int, dim: int, loop_dim: int, device=None) -> torch.Tensor:
    """(dim,) float32 loop-index embedding: [sin(t·f), cos(t·f), 0...], f over loop_dim/2."""
    half = loop_dim // 2
    j = torch.arange(half, device=device, dtype=torch.float32)
    freqs = torch.exp(j * (-2.0 * math.log(LOOP_THETA) / loop_dim))
    ang = float(t) * freqs
    emb = torch.zeros(dim, device=device, dtype=torch.float32)
    emb[:half] = ang.sin()
    emb[half:loop_dim] = ang.cos()
    return emb


def loop_prologue_torch(h: torch.Tensor, e: torch.Tensor, params: LoopParams, t: int,
                        out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``rmsnorm(h + loop_embed(t) + e) * norm_w`` (torch backend).

    Parameters
    ----------
    h, e : (N, D) fp32 / fp16 / bf16, same dtype.
    params : LoopParams.
    t : loop index (Python int, 0-based; may exceed max_loops).
    out : optional (N, D) buffer of h's dtype.

    Returns
    -------
    combined (N, D) in h's dtype, computed in float32.
    """
    check_step_args(h, e, params, out=out)
    s = h.float() + loop_embedding(t, params.dim, params.loop_dim, h.device) + e.float()
    y = s * torch.rsqrt(s.pow(2).mean(-1, keepdim=True) + params.eps) * params.norm_w.float()
    if out is None:
        return y.to(h.dtype)
    out.copy_(y)
    return out


def loop_epilogue_torch(block_out: torch.Tensor, h: torch.Tensor, e: torch.Tensor,
                        params: LoopParams, t: int, state: ACTState,
                        next_combined: Optional[torch.Tensor] = None) -> None:
    """LoRA + LTI injection + ACT update of loop ``t``, in place (torch backend).

    Parameters
    ----------
    block_out : (N, D) output of the shared block for loop t.
    h : (N, D) hidden state, updated in place.
    e : (N, D) frozen Prelude output.
    params : LoopParams.
    t : loop index (Python int); the LoRA scale row is ``min(t, max_loops - 1)``.
    state : ACTState with n_max >= N; rows [0, N) are updated in place.
    next_combined : optional (N, D) buffer; receives ``loop_prologue(h_new, e, params, t+1)``.
        It may alias ``block_out`` (each row is consumed before it is overwritten), so
        the runtime can ping-pong one activation buffer between block and epilogue.
    """
    check_step_args(h, e, params, block_out=block_out, state=state, out=next_combined)
    N = h.shape[0]
    tc = min(t, params.max_loops - 1)
    x = block_out.float()
    z = (x @ params.lora_down.float().t()) * params.lora_scale[tc].float()
    out = x + z @ params.lora_B.float()
    hn = params.A * h.float() + params.inj_B.float() * e.float() + out
    h.copy_(hn)
    hs = h.float()  # the stored state is what the ACT update and the next loop see
    p = torch.sigmoid(hs @ params.halt_w.float() + params.halt_b.float())
    cum, halted, h_out = state.cum_p[:N], state.halted[:N], state.h_out[:N]
    running = (~halted).float()
    w = torch.where(cum + p >= params.threshold, (1.0 - cum).clamp(min=0), p) * running
    h_out.copy_(h_out.float() + w[:, None] * hs)
    cum.add_(p * running)
    new_halted = halted | (cum >= params.threshold)
    state.n_running.sub_((new_halted & ~halted).sum().to(state.n_running.dtype))
    halted.copy_(new_halted)
    if next_combined is not None:
        loop_prologue_torch(h, e, params, t + 1, out=next_combined)


def loop_prologue(h, e, params, t, out=None, backend="auto"):
    """Dispatch ``loop_prologue`` to the backend chosen for h's device."""
    from .registry import select
    sel = select("loop_prologue", h.device, backend)
    return sel.fn(h, e, sel.prepare(params), t, out)


def loop_epilogue(block_out, h, e, params, t, state, next_combined=None, backend="auto"):
    """Dispatch ``loop_epilogue`` to the backend chosen for h's device."""
    from .registry import select
    sel = select("loop_epilogue", h.device, backend)
    return sel.fn(block_out, h, e, sel.prepare(params), t, state, next_combined)


register("loop_prologue", "torch", "mythos_rt.ops.recurrent:loop_prologue_torch")
register("loop_prologue", "triton", "mythos_rt.triton_kernels.recurrent_step:loop_prologue_triton")
register("loop_epilogue", "torch", "mythos_rt.ops.recurrent:loop_epilogue_torch")
register("loop_epilogue", "triton", "mythos_rt.triton_kernels.recurrent_step:loop_epilogue_triton")
register("loop_prologue", "cpu", "mythos_rt.cpu.recurrent:loop_prologue_cpu",
         prepare="mythos_rt.cpu.recurrent:prepare_loop", dtypes=CPU_DTYPES)
register("loop_epilogue", "cpu", "mythos_rt.cpu.recurrent:loop_epilogue_cpu",
         prepare="mythos_rt.cpu.recurrent:prepare_loop",
         bind="mythos_rt.cpu.recurrent:bind_loop_epilogue_cpu", dtypes=CPU_DTYPES)
# CUDA backends (mythos_rt._C, built with MYTHOS_RT_BUILD_CUDA=1); see docs/cuda.md. The
# prepare hook compiles the recurrent step for the model's sizes (NVRTC) where it can.
register("loop_prologue", "cuda", "mythos_rt.cuda.recurrent:loop_prologue_cuda",
         prepare="mythos_rt.cuda.jit:prepare_loop")
register("loop_epilogue", "cuda", "mythos_rt.cuda.recurrent:loop_epilogue_cuda",
         prepare="mythos_rt.cuda.jit:prepare_loop")

"""Glue between torch tensors and ``mythos_rt._C``: the module, dtype codes, pointers, streams."""

from __future__ import annotations

from typing import Optional

import torch

try:
    from mythos_rt import _C
except ImportError as exc:  # the registry reports this as a BackendError
    raise ImportError("mythos_rt._C is not built; reinstall with MYTHOS_RT_BUILD_CUDA=1 "
                      "(and nvcc on PATH): MYTHOS_RT_BUILD_CUDA=1 pip install "
                      "--no-build-isolation -e .") from exc

DTYPE_CODE = {torch.float32: _C.DTYPE_FLOAT32, torch.float16: _C.DTYPE_FLOAT16,
              torch.bfloat16: _C.DTYPE_BFLOAT16}


def dtype_code(name: str, t: torch.Tensor) -> int:
    if t.dtype not in DTYPE_CODE:
        raise TypeError(f"{name}: dtype {t.dtype} not supported (float32/float16/bfloat16)")
    return DTYPE_CODE[t.dtype]


def ptr(t: Optional[torch.Tensor]) -> int:
    return 0 if t is None else t.data_ptr()


def check_cuda(device: torch.device, **tensors: Optional[torch.Tensor]) -> None:
    """Every tensor given is a CUDA tensor on ``device`` (kernels read raw pointers)."""
    if device.type != "cuda":
        raise ValueError(f"the cuda backend needs CUDA tensors, got one on {device}")
    for name, t in tensors.items():
        if t is not None and t.device != device:
            raise ValueError(f"{name} is on {t.device}, expected {device}")


def check_dtype(name: str, t: torch.Tensor, dtype: torch.dtype) -> None:
    if t.dtype != dtype:
        raise TypeError(f"{name}: dtype {t.dtype}, expected {dtype}")


def check_contiguous(name: str, t: torch.Tensor) -> None:
    if not t.is_contiguous():
        raise ValueError(f"{name} must be contiguous (shape {tuple(t.shape)}, "
                         f"strides {t.stride()})")


def stream(device: torch.device) -> int:
    """The current torch stream's handle on ``device`` (what CUDA graphs capture)."""
    return torch.cuda.current_stream(device).cuda_stream

"""Triton kernels of mythos-rt, one op family per module (installed as mythos_rt.triton_kernels).

Triton kernels only run on a CUDA device or in Triton's interpreter. On a machine
without CUDA, ``import mythos_rt`` turns the interpreter on (TRITON_INTERPRET=1)
before Triton is imported, so the same kernels run on CPU tensors for testing. The
interpreter cannot run bf16 ``tl.dot``: use fp32/fp16 there.
"""

import os
import sys

import torch

if not torch.cuda.is_available():
    # An explicit TRITON_INTERPRET=0 is respected (ahead-of-time compile checks need it).
    if "triton" in sys.modules and "TRITON_INTERPRET" not in os.environ:
        raise ImportError(
            "mythos_rt.triton_kernels: no CUDA device and Triton was imported without "
            "TRITON_INTERPRET=1, so its kernels cannot run here; set TRITON_INTERPRET=1 "
            "before importing triton (or import mythos_rt first)")
    os.environ.setdefault("TRITON_INTERPRET", "1")


def interpreted() -> bool:
    """True when kernels in this package run under Triton's CPU interpreter."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"

"""CUDA backend of mythos-rt: torch-facing wrappers over the ``mythos_rt._C`` kernels.

* ``mythos_rt.cuda.moe``        ``moe_route_cuda``, ``moe_align_cuda`` (AOT, csrc/)
* ``mythos_rt.cuda.recurrent``  ``loop_prologue_cuda``, ``loop_epilogue_cuda`` (AOT, or the
  JIT-specialized kernels of ``mythos_rt.cuda.jit`` when prepared at compile time)
* ``mythos_rt.cuda.codegen``    CUDA source of the recurrent step with the model's sizes
  as compile-time constants (no CUDA needed to generate it)
* ``mythos_rt.cuda.jit``        NVRTC compile (CuPy) + on-disk cache of that source

Importing this package needs neither the extension nor CuPy: the op modules import
``mythos_rt._C`` themselves (the registry turns a missing extension into a
``BackendError``) and the JIT imports CuPy only when asked to compile.
"""

from __future__ import annotations

import importlib


def extension_available() -> bool:
    """True when ``mythos_rt._C`` was built (MYTHOS_RT_BUILD_CUDA=1) and imports."""
    try:
        importlib.import_module("mythos_rt._C")
    except ImportError:
        return False
    return True

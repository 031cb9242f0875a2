"""NVRTC specialization of the recurrent step: compile (CuPy), cache on disk, launch.

``prepare_loop(params)`` is the cuda recurrent step's prepare hook (a compile-time step):
``specialize_loop`` generates the source for the model's sizes
(``mythos_rt.cuda.codegen``), compiles it with NVRTC through CuPy (only when not
cached) and loads it as a ``cupy.RawModule``; the prepared ``SpecializedLoop`` carries
those kernels to ``loop_prologue_cuda`` / ``loop_epilogue_cuda``, which run the AOT
kernels of ``mythos_rt._C`` for plain ``LoopParams`` or where no kernels were compiled.
``MYTHOS_RT_CUDA_JIT=0`` turns the JIT off.

Cache: ``$MYTHOS_RT_CACHE_DIR/nvrtc/<sha256>.cubin`` (default ``~/.cache/mythos_rt``),
keyed by the generated source (which inlines the device headers), target arch, NVRTC
options and NVRTC version. CuPy is imported only here and only when compiling/launching:
it is an optional dependency of the GPU machines, never of a CPU install.
"""

from __future__ import annotations

import hashlib
import os
import warnings
from pathlib import Path
from dataclasses import dataclass
from typing import Dict, Optional

import torch

from ..buildcache import cache_dir as shared_cache_dir
from ..buildcache import write_atomic
from .codegen import KERNEL_NAMES, ROW_WARPS, LoopSpec, loop_step_source

__all__ = ["JITError", "cache_dir", "enabled", "compile_cubin", "specialize_loop",
           "LoopKernels", "SpecializedLoop", "prepare_loop"]

OPTIONS = ("--std=c++17",)


class JITError(RuntimeError):
    """NVRTC/CuPy could not compile or load a specialized kernel."""


def enabled() -> bool:
    return os.environ.get("MYTHOS_RT_CUDA_JIT", "1") != "0"


def cache_dir() -> Path:
    return shared_cache_dir("nvrtc")


def _cupy():
    try:
        import cupy
    except ImportError as exc:
        raise JITError("the CUDA JIT needs CuPy (pip install cupy-cuda13x)") from exc
    return cupy


def _include_dirs() -> list[str]:
    """CUDA toolkit include dirs for cuda_fp16.h / cuda_bf16.h (NVRTC may lack them)."""
    dirs = []
    for env in ("CUDA_PATH", "CUDA_HOME"):
        if os.environ.get(env):
            dirs.append(os.path.join(os.environ[env], "include"))
    try:
        from cupy.cuda import get_cuda_path
        if get_cuda_path():
            dirs.append(os.path.join(get_cuda_path(), "include"))
    except Exception:  # noqa: BLE001 — best effort
        pass
    dirs.append("/usr/local/cuda/include")
    seen, out = set(), []
    for d in dirs:
        if d not in seen and os.path.isfile(os.path.join(d, "cuda_bf16.h")):
            seen.add(d)
            out.append(d)
    return out


def arch_of(device: torch.device) -> str:
    major, minor = torch.cuda.get_device_capability(device)
    return f"sm_{major}{minor}" + ("a" if (major, minor) == (9, 0) else "")


def compile_cubin(source: str, arch: str, name: str = "mythos_loop.cu") -> Path:
    """NVRTC-compile ``source`` for ``arch`` (e.g. "sm_90a"), or return the cached cubin."""
    from cupy_backends.cuda.libs import nvrtc  # CuPy's NVRTC binding
    _cupy()
    options = [*OPTIONS, f"-arch={arch}", *(f"-I{d}" for d in _include_dirs())]
    version = ".".join(map(str, nvrtc.getVersion()))
    key = hashlib.sha256("\0".join([source, arch, *OPTIONS, version]).encode()).hexdigest()
    path = cache_dir() / f"{key}.cubin"
    if path.is_file():
        return path
    prog = nvrtc.createProgram(source, name, [], [])
    try:
        try:
            nvrtc.compileProgram(prog, options)
        except nvrtc.NVRTCError as exc:
            raise JITError(f"NVRTC failed for {name} ({arch}):\n{nvrtc.getProgramLog(prog)}") from exc
        cubin = nvrtc.getCUBIN(prog)
    finally:
        nvrtc.destroyProgram(prog)
    write_atomic(path, cubin)  # concurrent compiles of one key are harmless
    return path


def _aligned(vec: int, tensors, strides) -> bool:
    if vec == 1:
        return True
    return all(t is None or t.data_ptr() % 16 == 0 for t in tensors) and \
        all(s % vec == 0 for s in strides)


class LoopKernels:
    """The specialized prologue/epilogue kernels of one ``LoopSpec`` on one device.

    ``prologue``/``epilogue`` launch on the current torch stream and return True, or
    return False (launching nothing) when the tensors' alignment does not fit the
    compiled vector width; the caller then runs the AOT kernel.
    """

    def __init__(self, spec: LoopSpec, device: torch.device, cubin: Path):
        cp = _cupy()
        self.spec, self.device, self.cubin = spec, device, cubin
        with cp.cuda.Device(device.index):
            self.module = cp.RawModule(path=str(cubin))
            self.fns = {n: self.module.get_function(n) for n in KERNEL_NAMES}
        self._streams: Dict[int, object] = {}

    def _stream(self):
        handle = torch.cuda.current_stream(self.device).cuda_stream
        s = self._streams.get(handle)
        if s is None:
            s = self._streams[handle] = _cupy().cuda.ExternalStream(handle, self.device.index)
        return s

    def _launch(self, name: str, n_rows: int, args) -> None:
        import numpy as np
        grid = ((n_rows + ROW_WARPS - 1) // ROW_WARPS,)
        conv = [np.uint64(a) if kind == "p" else np.int64(a) if kind == "l" else np.int32(a)
                for kind, a in args]
        with _cupy().cuda.Device(self.device.index):
            self.fns[name](grid, (32 * ROW_WARPS,), tuple(conv), stream=self._stream())

    def prologue(self, h, e, params, t: int, out) -> bool:
        if not _aligned(self.spec.vec, (h, e, out, params.norm_w),
                        (h.stride(0), e.stride(0), out.stride(0))):
            return False
        p = [("p", h.data_ptr()), ("p", e.data_ptr()), ("p", params.norm_w.data_ptr()),
             ("p", out.data_ptr()), ("l", h.stride(0)), ("l", e.stride(0)),
             ("l", out.stride(0)), ("i", h.shape[0]), ("i", t)]
        self._launch(KERNEL_NAMES[0], h.shape[0], p)
        return True

    def epilogue(self, block_out, h, e, params, t: int, state, next_combined) -> bool:
        nc = next_combined
        weights = (params.norm_w, params.lora_down, params.lora_B, params.A, params.inj_B,
                   params.halt_w)
        strides = [block_out.stride(0), h.stride(0), e.stride(0), state.h_out.stride(0)]
        if nc is not None:
            strides.append(nc.stride(0))
        if not _aligned(self.spec.vec, (block_out, h, e, state.h_out, nc, *weights), strides):
            return False
        ptrs = (block_out, h, e, state.h_out, state.cum_p, state.halted, state.n_running, nc,
                params.norm_w, params.lora_down, params.lora_B, params.lora_scale, params.A,
                params.inj_B, params.halt_w, params.halt_b)
        args = [("p", 0 if q is None else q.data_ptr()) for q in ptrs]
        args += [("l", s) for s in (block_out.stride(0), h.stride(0), e.stride(0),
                                    state.h_out.stride(0), nc.stride(0) if nc is not None else 0)]
        args += [("i", h.shape[0]), ("i", t), ("i", min(t, params.max_loops - 1))]
        self._launch(KERNEL_NAMES[2] if nc is not None else KERNEL_NAMES[1], h.shape[0], args)
        return True


def specialize_loop(params, dtype: torch.dtype, device) -> LoopKernels:
    """Compile (or fetch from the disk cache) and load the kernels for ``params``.

    A compile-time step, never under CUDA-graph capture. Raises ``JITError`` when
    CuPy/NVRTC cannot do it.
    """
    device = torch.device(device)
    if device.type != "cuda":
        raise JITError(f"specialize_loop needs a CUDA device, got {device}")
    if device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    spec = LoopSpec.from_params(params, dtype)
    return LoopKernels(spec, device, compile_cubin(loop_step_source(spec), arch_of(device)))


@dataclass(frozen=True)
class SpecializedLoop:
    """The cuda recurrent step's prepared arguments: the ``LoopParams`` and the kernels
    compiled for them, or None to run the ahead-of-time kernels of ``mythos_rt._C``."""
    params: object  # LoopParams
    kernels: Optional[LoopKernels]


def prepare_loop(params) -> SpecializedLoop:
    """The prepare hook of the cuda ``loop_prologue`` / ``loop_epilogue``: specialize the
    recurrent step to the model's sizes and storage dtype on its device (NVRTC).

    Off with ``MYTHOS_RT_CUDA_JIT=0``; where CuPy/NVRTC cannot compile it, a warning and
    the ahead-of-time kernels. Runs at compile time, before any graph capture.
    """
    if not enabled():
        return SpecializedLoop(params, None)
    try:
        kernels = specialize_loop(params, params.norm_w.dtype, params.norm_w.device)
    except JITError as exc:
        warnings.warn(f"recurrent step: NVRTC specialization unavailable ({exc}); "
                      "using the ahead-of-time CUDA kernels", stacklevel=2)
        kernels = None
    return SpecializedLoop(params, kernels)

"""Ops registry: one implementation record per (op, backend).

Each fused op has a ``torch`` implementation (composite PyTorch, any device, the per-op
reference) and optionally ``triton``, ``cuda`` and ``cpu`` ones. An ``Impl`` record names
the implementation's function and its optional hooks by dotted path ("module:function");
they are imported only when selected, so importing mythos-rt never imports Triton or
the CUDA extension. The hooks, all called by the lowering at compile time:

* ``prepare(args) -> args'``: the op's generic arguments (``MLAWeights``, ``PackedMoE``,
  ``LoopParams``, ...) in the form the function runs on (the cpu backend's fused
  weights; the cuda recurrent step's NVRTC-specialized kernels). Identity when absent.
* ``bind(*call) -> launch | None``: given the arguments of one call on buffers that
  never move (a plan step), a zero-argument launch with everything it can fix already
  fixed (the cpu backend: a compiled kernel with its addresses), or None to be called
  plainly (``Selected.launcher``).
* ``caches(cfg, batch, seq_len, dtype, device) -> (first, second)``: one attention
  layer's KV caches in the memory layout the function reads (the cpu MLA: one joint
  buffer whose views are the two caches); ``ops.attention.new_caches`` otherwise.
* ``workspace(max_tokens, args', device) -> scratch``: buffers the function takes as its
  ``workspace`` argument, sized for ``max_tokens`` rows (the Triton MoE).

``dtypes`` (optional): the storage dtypes ``backend="auto"`` picks the implementation
for (the cpu backend registers ``CPU_DTYPES``, float32 and bfloat16: for other dtypes it
would only hold unused copies). A backend asked for by name is used whatever
the dtype.

Selection (``select``): ``backend="auto"`` picks triton > cuda > torch on a CUDA device
and cpu > torch on the CPU, the first one registered, usable there and registered for
the model's dtype; a named backend is used as asked, or is a clear error if that op has
no such implementation. Per-op overrides (``{"moe_ffn": "torch"}``) win over the global
choice, for debugging.
"""

from __future__ import annotations

import importlib
import importlib.util
from dataclasses import dataclass
from typing import Callable, Iterable, Mapping, Optional

import torch

from ..cuda import extension_available

BACKENDS = ("torch", "triton", "cuda", "cpu")
# Triton first until the GPU benchmarks show where a hand-written CUDA kernel wins
# (docs/cuda.md); ask for "cuda" explicitly or per op through overrides meanwhile.
_AUTO_ORDER_GPU = ("triton", "cuda", "torch")
_AUTO_ORDER_CPU = ("cpu", "torch")
HOOKS = ("prepare", "bind", "caches", "workspace")
# The storage dtypes the cpu backend registers for: its kernels stream float32 weights,
# or bfloat16 ones widened to float32 in registers (attention, MoE, dense FFN, head; norms
# and loop steps run the torch implementations in bf16).
CPU_DTYPES = (torch.float32, torch.bfloat16)


class BackendError(RuntimeError):
    """The requested backend cannot run this op here."""


@dataclass(frozen=True)
class Impl:
    """One registered implementation: its function and hooks as dotted paths (see the
    module docstring), and the storage dtypes auto selection uses it for (None: any)."""
    op: str
    backend: str
    fn: str
    prepare: Optional[str] = None
    bind: Optional[str] = None
    caches: Optional[str] = None
    workspace: Optional[str] = None
    dtypes: Optional[frozenset] = None

    def serves(self, dtype: Optional[torch.dtype]) -> bool:
        """Whether auto selection may pick this implementation for a ``dtype`` model."""
        return dtype is None or self.dtypes is None or dtype in self.dtypes


_IMPLS: dict[str, dict[str, Impl]] = {}


def register(op: str, backend: str, fn: str, *, prepare: Optional[str] = None,
             bind: Optional[str] = None, caches: Optional[str] = None,
             workspace: Optional[str] = None,
             dtypes: Optional[Iterable[torch.dtype]] = None) -> Impl:
    """Register ``fn`` ("package.module:function") as ``op``'s ``backend`` implementation,
    with its optional hooks (each "module:function") and auto-selection ``dtypes``."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; expected one of {BACKENDS}")
    for path in (fn, prepare, bind, caches, workspace):
        if path is not None and ":" not in path:
            raise ValueError(f"target must look like 'module:function', got {path!r}")
    impl = Impl(op, backend, fn, prepare, bind, caches, workspace,
                None if dtypes is None else frozenset(dtypes))
    _IMPLS.setdefault(op, {})[backend] = impl
    return impl


def ops() -> list[str]:
    return sorted(_IMPLS)


def backends_of(op: str) -> list[str]:
    """Backends registered for ``op``, in BACKENDS order."""
    if op not in _IMPLS:
        raise KeyError(f"unknown op {op!r}; registered ops: {', '.join(ops())}")
    return [b for b in BACKENDS if b in _IMPLS[op]]


def record(op: str, backend: str) -> Impl:
    """The registered record of ``op``'s ``backend`` implementation."""
    if backend not in backends_of(op):
        raise BackendError(f"op {op!r} has no {backend!r} implementation "
                           f"(available: {', '.join(backends_of(op))})")
    return _IMPLS[op][backend]


def records() -> list[Impl]:
    """Every registered implementation."""
    return [impl for op in ops() for impl in _IMPLS[op].values()]


def _import(op: str, backend: str, path: str) -> Callable:
    module, _, name = path.partition(":")
    try:
        return getattr(importlib.import_module(module), name)
    except ImportError as exc:
        raise BackendError(f"op {op!r}: the {backend!r} backend cannot be imported: {exc}") from exc


def load(op: str, backend: str) -> Callable:
    """Import and return ``op``'s ``backend`` implementation."""
    return _import(op, backend, record(op, backend).fn)


def _identity(args):
    return args


@dataclass(frozen=True)
class Selected:
    """A resolved implementation: which backend, the callable and its imported hooks
    (``prepare`` is the identity unless the implementation registered one)."""
    op: str
    backend: str
    fn: Callable
    prepare: Callable = _identity
    bind: Optional[Callable] = None
    caches: Optional[Callable] = None
    workspace: Optional[Callable] = None

    def launcher(self, *args, **kwargs) -> Callable[[], object]:
        """A zero-argument launch of ``fn(*args, **kwargs)`` on arguments that will not
        move: the implementation's prebound form where its binder has one, else the call."""
        if self.bind is not None:
            launch = self.bind(*args, **kwargs)
            if launch is not None:
                return launch
        fn = self.fn
        return lambda: fn(*args, **kwargs)


def resolve(impl: Impl) -> Selected:
    """Import ``impl``'s function and hooks."""
    hooks = {h: _import(impl.op, impl.backend, getattr(impl, h))
             for h in HOOKS if getattr(impl, h) is not None}
    return Selected(impl.op, impl.backend, _import(impl.op, impl.backend, impl.fn), **hooks)


def _usable(backend: str, device: torch.device) -> bool:
    if backend == "torch":
        return True
    if backend == "cpu":
        return device.type == "cpu"
    if device.type != "cuda":
        return False
    if backend == "cuda":
        return extension_available()
    return importlib.util.find_spec("triton") is not None


def select(op: str, device: torch.device | str, backend: str = "auto",
           overrides: Optional[Mapping[str, str]] = None,
           dtype: Optional[torch.dtype] = None) -> Selected:
    """Resolve the implementation of ``op`` for ``device`` (see module docstring).

    ``dtype``: the model's storage dtype when known; auto skips implementations not
    registered for it (``Impl.dtypes``).
    """
    device = torch.device(device)
    wanted = (overrides or {}).get(op, backend)
    if wanted == "auto":
        order = _AUTO_ORDER_GPU if device.type == "cuda" else _AUTO_ORDER_CPU
        for b in order:
            if b in backends_of(op) and _usable(b, device) and _IMPLS[op][b].serves(dtype):
                return resolve(_IMPLS[op][b])
        raise BackendError(f"op {op!r}: no usable implementation on {device}")
    if wanted not in BACKENDS:
        raise BackendError(f"unknown backend {wanted!r} for op {op!r}; "
                           f"expected 'auto' or one of {BACKENDS}")
    if wanted == "cuda" and device.type != "cuda":
        raise BackendError(f"op {op!r}: the 'cuda' backend needs a CUDA device, got {device}")
    if wanted == "cuda" and not extension_available():
        raise BackendError(f"op {op!r}: the 'cuda' backend needs the mythos_rt._C extension "
                           "(reinstall with MYTHOS_RT_BUILD_CUDA=1)")
    if wanted == "cpu" and device.type != "cpu":
        raise BackendError(f"op {op!r}: the 'cpu' backend runs on the CPU only, got {device}")
    # "triton" on CPU is allowed: mythos_rt.triton_kernels runs it under the interpreter.
    return resolve(record(op, wanted))

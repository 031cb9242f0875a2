"""Ops registry: each fused op has a `torch` implementation and optionally `triton`,
`cuda` and `cpu` ones.

Implementations are registered by dotted path ("module:function") and imported only
when selected, so importing mythos-rt never imports Triton or the CUDA extension.
``torch`` is the per-op reference (composite PyTorch, any device); ``cpu`` is the lean
CPU decode path of ``mythos_rt.cpu`` (few dispatches per token, weights pre-fused).

Selection (``select``): ``backend="auto"`` picks triton > cuda > torch on a CUDA device
and cpu > torch on the CPU (cpu for float32 models only), the first one registered and
importable; a named backend is used as asked, or is a clear error if that op has no
such implementation. Per-op overrides (``{"moe_ffn": "torch"}``) win over the global
choice, for debugging.

An implementation may come with a ``prepare`` function that turns the op's generic
arguments (``MLAWeights``, ``PackedMoE``, ``LoopParams``) into the form it runs on; the
lowering calls it once, at compile time. It may also come with a ``bind`` function: given
the arguments of one call on buffers that never move (a plan step), it returns a
zero-argument launch with everything it can fix already fixed (the cpu backend: a
compiled kernel with its addresses), or None to be called plainly
(``Selected.launcher``). An attention implementation may also choose how its two KV
caches are laid out in memory (``caches``; the cpu backend: one joint buffer whose views
are the two caches); otherwise ``ops.attention.new_caches`` allocates them apart.
"""

from __future__ import annotations

import importlib
import importlib.util
from dataclasses import dataclass
from typing import Callable, Mapping, Optional

import torch

BACKENDS = ("torch", "triton", "cuda", "cpu")
# Triton first until the GPU benchmarks show where a hand-written CUDA kernel wins
# (docs/cuda.md); ask for "cuda" explicitly or per op through overrides meanwhile.
_AUTO_ORDER_GPU = ("triton", "cuda", "torch")
_AUTO_ORDER_CPU = ("cpu", "torch")

_REGISTRY: dict[str, dict[str, str]] = {}
_PREPARE: dict[tuple[str, str], str] = {}
_BIND: dict[tuple[str, str], str] = {}
_CACHES: dict[tuple[str, str], str] = {}


class BackendError(RuntimeError):
    """The requested backend cannot run this op here."""


def register(op: str, backend: str, target: str, prepare: Optional[str] = None,
             bind: Optional[str] = None, caches: Optional[str] = None) -> None:
    """Register ``target`` ("package.module:function") as ``op``'s ``backend`` implementation,
    with an optional ``prepare`` ("module:function") for its arguments, ``bind`` for
    prebound launches and ``caches`` for its KV-cache allocation."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; expected one of {BACKENDS}")
    for path in (target, prepare, bind, caches):
        if path is not None and ":" not in path:
            raise ValueError(f"target must look like 'module:function', got {path!r}")
    _REGISTRY.setdefault(op, {})[backend] = target
    if prepare is not None:
        _PREPARE[(op, backend)] = prepare
    if bind is not None:
        _BIND[(op, backend)] = bind
    if caches is not None:
        _CACHES[(op, backend)] = caches


def ops() -> list[str]:
    return sorted(_REGISTRY)


def backends_of(op: str) -> list[str]:
    """Backends registered for ``op``, in BACKENDS order."""
    if op not in _REGISTRY:
        raise KeyError(f"unknown op {op!r}; registered ops: {', '.join(ops())}")
    return [b for b in BACKENDS if b in _REGISTRY[op]]


def _import(op: str, backend: str, path: str) -> Callable:
    module, _, name = path.partition(":")
    try:
        return getattr(importlib.import_module(module), name)
    except ImportError as exc:
        raise BackendError(f"op {op!r}: the {backend!r} backend cannot be imported: {exc}") from exc


def load(op: str, backend: str) -> Callable:
    """Import and return ``op``'s ``backend`` implementation."""
    if backend not in backends_of(op):
        raise BackendError(f"op {op!r} has no {backend!r} implementation "
                           f"(available: {', '.join(backends_of(op))})")
    return _import(op, backend, _REGISTRY[op][backend])


def _identity(args):
    return args


@dataclass(frozen=True)
class Selected:
    """A resolved implementation: which backend, the callable, its argument prepare step
    (identity unless the implementation registered one), its binder and its KV-cache
    allocator (if any)."""
    op: str
    backend: str
    fn: Callable
    prepare: Callable = _identity
    bind: Optional[Callable] = None
    caches: Optional[Callable] = None

    def launcher(self, *args, **kwargs) -> Callable[[], object]:
        """A zero-argument launch of ``fn(*args, **kwargs)`` on arguments that will not
        move: the implementation's prebound form where its binder has one, else the call."""
        if self.bind is not None:
            launch = self.bind(*args, **kwargs)
            if launch is not None:
                return launch
        fn = self.fn
        return lambda: fn(*args, **kwargs)


def _selected(op: str, backend: str) -> Selected:
    hook = lambda table: _import(op, backend, table[(op, backend)]) if (op, backend) in table else None  # noqa: E731
    return Selected(op, backend, load(op, backend), hook(_PREPARE) or _identity,
                    hook(_BIND), hook(_CACHES))


def _cuda_extension_available() -> bool:
    try:
        importlib.import_module("mythos_rt._C")
    except ImportError:
        return False
    return True


def _usable(backend: str, device: torch.device) -> bool:
    if backend == "torch":
        return True
    if backend == "cpu":
        return device.type == "cpu"
    if device.type != "cuda":
        return False
    if backend == "cuda":
        return _cuda_extension_available()
    return importlib.util.find_spec("triton") is not None


def select(op: str, device: torch.device | str, backend: str = "auto",
           overrides: Optional[Mapping[str, str]] = None,
           dtype: Optional[torch.dtype] = None) -> Selected:
    """Resolve the implementation of ``op`` for ``device`` (see module docstring).

    ``dtype``: the model's storage dtype when known; auto skips the cpu backend for
    anything but float32 and bfloat16 (its fast paths; it would only hold unused copies).
    """
    device = torch.device(device)
    wanted = (overrides or {}).get(op, backend)
    if wanted == "auto":
        order = _AUTO_ORDER_GPU if device.type == "cuda" else _AUTO_ORDER_CPU
        if dtype is not None and dtype not in (torch.float32, torch.bfloat16):
            order = tuple(b for b in order if b != "cpu")
        for b in order:
            if b in backends_of(op) and _usable(b, device):
                return _selected(op, b)
        raise BackendError(f"op {op!r}: no usable implementation on {device}")
    if wanted not in BACKENDS:
        raise BackendError(f"unknown backend {wanted!r} for op {op!r}; "
                           f"expected 'auto' or one of {BACKENDS}")
    if wanted == "cuda" and device.type != "cuda":
        raise BackendError(f"op {op!r}: the 'cuda' backend needs a CUDA device, got {device}")
    if wanted == "cuda" and not _cuda_extension_available():
        raise BackendError(f"op {op!r}: the 'cuda' backend needs the mythos_rt._C extension "
                           "(reinstall with MYTHOS_RT_BUILD_CUDA=1)")
    if wanted == "cpu" and device.type != "cpu":
        raise BackendError(f"op {op!r}: the 'cpu' backend runs on the CPU only, got {device}")
    # "triton" on CPU is allowed: mythos_rt.triton_kernels runs it under the interpreter.
    return _selected(op, wanted)

"""The cpu backend's compiled row kernels (``decode_row.cpp``, over the shared math of
``row_math.h``): build, cache, load.

A decode step is a few small matrix-vector products per sublayer and row; run as
PyTorch calls it is bound by their dispatch. ``decode_row.cpp`` runs each sublayer
(RMSNorm, MLA, GQA, MoE, dense FFN, head, the loop epilogue) for all of a step's rows in
one C call; the matrix kernels also over bf16 weights (``*_bf16``, widened in
registers). It is compiled here, on the machine that runs it, with the host C++ compiler
(``$CXX``, else ``c++``/``g++``) at ``-O3 -march=native`` (``march``), cached on disk by
a hash of the sources, flags, compiler and CPU, and loaded with ctypes (plain C ABI: no
Python or torch headers, any torch version). Without a compiler, or with
``MYTHOS_RT_CPU_NATIVE=0``, ``library()`` is None (with one warning saying why) and the
cpu ops run their PyTorch paths.

Threads: built with OpenMP where the compiler has it, the kernels split their work
(output rows or columns of each product, heads, experts, or rows) over up to four of
torch's threads (``torch.set_num_threads`` applies) — allowed only when the process has
one OpenMP runtime, i.e. ours resolved to torch's libgomp; otherwise they run on the
calling thread. On a machine shared with other busy processes, start Python with
``OMP_WAIT_POLICY=PASSIVE``: spin-waiting team members then stop stealing the cores a
descheduled member needs (docs/cpu.md).

Vector paths: ``-march=native`` (AVX-512 where the CPU has it, else AVX2 + FMA);
``MYTHOS_RT_CPU_ARCH`` overrides it (``x86-64-v3``: the AVX2 path anywhere).

Cache: ``$MYTHOS_RT_CACHE_DIR/cpu/<sha256>.so`` (default ``~/.cache/mythos_rt``); when
that is not writable, a fresh temporary directory (one build per process).

The ``ctypes.Structure`` classes below mirror the C structs field for field.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import re
import shutil
import subprocess
import tempfile
import warnings
from dataclasses import dataclass
from functools import lru_cache, partial
from pathlib import Path
from typing import Callable, Mapping, Optional

import torch

from ..buildcache import cache_dir as shared_cache_dir
from ..buildcache import replacing

__all__ = ["SOURCE", "HEADER", "FLAGS", "OPENMP", "march", "flags", "NativeError", "enabled", "cache_dir", "compiler",
           "build", "library", "describe", "reset", "openmp_runtimes", "address", "prebound",
           "bind_rows", "bind_staged", "in_cache_launch", "run_bound", "contiguous", "MlaRow", "GqaRow",
           "MoeRow", "FfnRow", "HeadRow", "LoopRow", "Kernel", "kernel", "ReadProbe"]

SOURCE = Path(__file__).with_name("decode_row.cpp")
HEADER = Path(__file__).with_name("row_math.h")  # the shared math SOURCE includes
FLAGS = ("-O3", "-std=c++17", "-fPIC", "-shared", "-fno-math-errno")
OPENMP = "-fopenmp"

_i32 = ctypes.c_int32
_vp = ctypes.c_void_p


class NativeError(RuntimeError):
    """The row kernels could not be compiled or loaded."""


class MlaRow(ctypes.Structure):
    _fields_ = [("D", _i32), ("H", _i32), ("R", _i32), ("P", _i32), ("q_lora", _i32),
                ("nope", _i32), ("v", _i32), ("eps", ctypes.c_float),
                ("down", _vp), ("kv_norm", _vp), ("q_up", _vp), ("w_uk", _vp),
                ("w_uv", _vp), ("wo", _vp)]


class GqaRow(ctypes.Structure):
    _fields_ = [("D", _i32), ("H", _i32), ("Hkv", _i32), ("d", _i32), ("qkv", _vp),
                ("wo", _vp)]


class MoeRow(ctypes.Structure):
    _fields_ = [("D", _i32), ("E", _i32), ("S", _i32), ("I", _i32), ("k", _i32),
                ("L", _i32), ("start", _i32), ("router", _vp), ("front_bias", _vp),
                ("router_bias", _vp), ("w13", _vp), ("w2", _vp)]


class FfnRow(ctypes.Structure):
    _fields_ = [("D", _i32), ("H", _i32), ("w13", _vp), ("down", _vp)]


class HeadRow(ctypes.Structure):
    _fields_ = [("V", _i32), ("D", _i32), ("w", _vp)]


class LoopRow(ctypes.Structure):
    _fields_ = [("D", _i32), ("r", _i32), ("eps", ctypes.c_float),
                ("threshold", ctypes.c_float),
                ("lora_B", _vp), ("A", _vp), ("inj_B", _vp), ("halt_w", _vp), ("halt_b", _vp),
                ("norm_w", _vp)]


_SIGNATURES = {
    "rmsnorm_rows": [_vp, _vp, _vp, ctypes.c_float, _i32, _i32, _vp, _vp],
    "rmsnorm_rows_bf16": [_vp, _vp, _vp, ctypes.c_float, _i32, _i32, _vp, _vp],
    "mla_decode_rows": [ctypes.POINTER(MlaRow), _vp, _vp, ctypes.c_int64, _vp, _i32, _i32, _vp,
                        _vp, _vp],
    "mla_decode_rows_bf16": [ctypes.POINTER(MlaRow), _vp, _vp, ctypes.c_int64, _vp, _i32, _i32,
                             _vp, _vp, _vp],
    "gqa_decode_rows": [ctypes.POINTER(GqaRow), _vp, _vp, _vp, ctypes.c_int64, _vp, _i32, _i32,
                        _vp, _vp, _vp],
    "gqa_decode_rows_bf16": [ctypes.POINTER(GqaRow), _vp, _vp, _vp, ctypes.c_int64, _vp, _i32,
                             _i32, _vp, _vp, _vp],
    "moe_rows": [ctypes.POINTER(MoeRow), _vp, _i32, _vp],
    "moe_rows_bf16": [ctypes.POINTER(MoeRow), _vp, _i32, _vp],
    "ffn_rows": [ctypes.POINTER(FfnRow), _vp, _i32, _vp],
    "ffn_rows_bf16": [ctypes.POINTER(FfnRow), _vp, _i32, _vp],
    "head_rows": [ctypes.POINTER(HeadRow), _vp, _i32, _vp],
    "head_rows_bf16": [ctypes.POINTER(HeadRow), _vp, _i32, _vp],
    "loop_epilogue_rows": [ctypes.POINTER(LoopRow), _vp, _vp, _vp, _vp, _i32, _vp, _vp, _vp,
                           _vp, _vp, _vp],
    "loop_epilogue_rows_bf16": [ctypes.POINTER(LoopRow), _vp, _vp, _vp, _vp, _i32, _vp, _vp,
                                _vp, _vp, _vp, _vp],
    "set_parallel": [_i32],
    "has_openmp": [],
    "team_threads": [],
    "vector_bits": [],
    "stream_sum": [_vp, ctypes.c_int64],
}


def address(t: Optional[torch.Tensor]) -> Optional[int]:
    """A tensor's address for a C call; None (a null pointer) for a missing tensor."""
    return None if t is None else t.data_ptr()


def prebound(fn: Callable, *args, keep: tuple = ()) -> Callable:
    """``fn`` with its arguments fixed (addresses included), holding ``keep`` — the tensors
    those addresses point into — for as long as the call itself lives."""
    call = partial(fn, *args)
    call.keep = keep
    return call


def bind_rows(k: Optional[Kernel], x: torch.Tensor, out: Optional[torch.Tensor],
              max_rows: int, width: Optional[int] = None) -> Optional[Callable[[], torch.Tensor]]:
    """A prebound ``k.fn(k.ref, x, N, out)`` for N = 1..max_rows contiguous float32 rows
    ``x`` (N, D) into ``out`` (N, ``width``; default D), returning ``out``; None where that
    does not apply (no kernel, other rows, no ``out``)."""
    if (k is None or x.dim() != 2 or not 1 <= x.shape[0] <= max_rows
            or x.dtype != torch.float32 or out is None
            or out.shape != (x.shape[0], x.shape[1] if width is None else width)
            or not contiguous(x, out)):
        return None
    call = prebound(k.fn, k.ref, x.data_ptr(), x.shape[0], out.data_ptr(), keep=(x, out))

    def launch():
        call()
        return out
    return launch


def bind_staged(bind32: Callable[[torch.Tensor, torch.Tensor], Optional[Callable]],
                x: torch.Tensor, out: Optional[torch.Tensor]) -> Optional[Callable[[], torch.Tensor]]:
    """bfloat16 rows ``x`` into bfloat16 ``out`` through a kernel that takes float32 rows
    (its weights bf16): ``bind32(x32, out32)`` binds it to float32 staging copies of both
    (allocated here, once per binding); the launch widens ``x`` into them, runs, and
    rounds the result into ``out`` once, returning ``out``. None where ``bind32`` declines
    or ``x``/``out`` are not bf16 (``out`` contiguous)."""
    if (x.dtype != torch.bfloat16 or out is None or out.dtype != torch.bfloat16
            or not out.is_contiguous()):
        return None
    x32, out32 = torch.empty(x.shape), torch.empty(out.shape)
    launch32 = bind32(x32, out32)
    if launch32 is None:
        return None

    def launch():
        x32.copy_(x)
        launch32()
        return out.copy_(out32)
    return launch


def in_cache_launch(call: Callable[[], int], op: str, cache_lens: torch.Tensor, S_max: int,
                    out: torch.Tensor) -> Callable[[], torch.Tensor]:
    """The launch of a prebound attention kernel, returning ``out``: its nonzero return
    (a position outside the cache of ``S_max`` slots; nothing was written) becomes a
    ValueError naming ``op`` and the positions."""
    def launch():
        if call():
            raise ValueError(f"{op}: positions {cache_lens.tolist()} reach outside the cache "
                             f"of {S_max} slots")
        return out
    return launch


def run_bound(bind: Callable[[torch.Tensor], Optional[Callable]], x: torch.Tensor,
              out: Optional[torch.Tensor], width: Optional[int] = None) -> Optional[torch.Tensor]:
    """Run an op once through its binder: ``bind(target)`` with ``out`` as the target, or a
    new tensor like ``x`` (last dimension ``width`` when given; then copied into ``out``, if
    any) when ``out`` is missing or not contiguous. Returns the result, or None where the
    binder declines."""
    target = (out if out is not None and out.is_contiguous() else torch.empty_like(x)
              if width is None else x.new_empty(*x.shape[:-1], width))
    launch = bind(target)
    if launch is None:
        return None
    launch()
    return target if out is None or target is out else out.copy_(target)


def contiguous(*tensors: Optional[torch.Tensor]) -> bool:
    """Whether every given tensor (None is skipped) can be passed as a flat address."""
    return all(t is None or t.is_contiguous() for t in tensors)


@dataclass(frozen=True)
class Kernel:
    """A row kernel bound to its weights: call ``fn(ref, ...)``. ``keep`` holds the
    tensors whose addresses ``args`` carries, so they live as long as the kernel."""
    fn: Callable
    args: ctypes.Structure
    ref: object
    keep: tuple


def kernel(lib: ctypes.CDLL, name: str, struct: type, sizes: Mapping[str, float],
           tensors: Mapping[str, Optional[torch.Tensor]],
           bf16: tuple[str, ...] = ()) -> Kernel:
    """Bind kernel ``name`` to ``struct(**sizes, **addresses of tensors)``; every tensor
    must be a contiguous float32 CPU tensor (bfloat16 for the keys in ``bf16``; None passes
    a null pointer)."""
    for key, t in tensors.items():
        want = torch.bfloat16 if key in bf16 else torch.float32
        if t is not None and (t.dtype != want or t.device.type != "cpu"
                              or not t.is_contiguous()):
            raise NativeError(f"{name}: {key} must be a contiguous {str(want)[6:]} CPU tensor, "
                              f"got {t.dtype} {tuple(t.shape)} on {t.device}")
    args = struct(**sizes, **{k: address(t) for k, t in tensors.items()})
    return Kernel(getattr(lib, name), args, ctypes.byref(args),
                  tuple(t for t in tensors.values() if t is not None))


def enabled() -> bool:
    return os.environ.get("MYTHOS_RT_CPU_NATIVE", "1") != "0"


def march() -> str:
    """The instruction set the kernels are compiled for: ``$MYTHOS_RT_CPU_ARCH`` (a GCC
    ``-march`` value, e.g. ``x86-64-v3`` for AVX2 + FMA without AVX-512), else ``native``:
    every feature of the CPU that builds them (AVX-512 where it has it, else AVX2)."""
    return os.environ.get("MYTHOS_RT_CPU_ARCH", "native")


def flags(openmp: bool) -> tuple[str, ...]:
    """The compiler flags of a build: FLAGS, the target (``march``), the header's folder,
    and OpenMP when asked."""
    return FLAGS + (f"-march={march()}", f"-I{HEADER.parent}") + ((OPENMP,) if openmp else ())


def cache_dir() -> Path:
    return shared_cache_dir("cpu")


def compiler() -> Optional[str]:
    """The C++ compiler to use: ``$CXX``, else the first of c++ / g++ / clang++ on PATH."""
    if os.environ.get("CXX"):
        return shutil.which(os.environ["CXX"])
    for name in ("c++", "g++", "clang++"):
        path = shutil.which(name)
        if path:
            return path
    return None


@lru_cache(maxsize=None)
def cpu_facts() -> dict:
    """The CPU model and its vector-relevant feature flags (for results files: the same
    code runs AVX-512 on one machine and AVX2 on another); /proc/cpuinfo is read once.
    Callers must not modify the returned dict."""
    fields = {}
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                key = line.split(":", 1)[0].strip()
                if key in ("model name", "flags") and key not in fields:
                    fields[key] = line.split(":", 1)[1].strip()
    except OSError:
        pass
    keep = ("avx", "fma", "f16c", "amx")
    flags = [f for f in fields.get("flags", "").split() if f.startswith(keep)]
    return {"cpu": fields.get("model name") or platform.processor() or platform.machine(),
            "cpu_flags": " ".join(flags) if "flags" in fields else "unknown"}


def native_bf16_matmul() -> bool:
    """Whether this CPU multiplies bf16 in hardware (AVX512-BF16 or AMX-BF16), which is
    what makes torch's bf16 matmuls (oneDNN) fast; without it they are far slower than
    widening bf16 weights in the row kernels (docs/cpu.md, "bf16")."""
    flags = cpu_facts()["cpu_flags"].split()
    return "avx512_bf16" in flags or "amx_bf16" in flags


def kernel_row_limit(limit: int, dtype: torch.dtype) -> int:
    """The most rows a row kernel takes before torch's matmuls do: ``limit`` (where a
    blocked GEMM starts to win), except for bf16 weights on a CPU without bf16 hardware,
    where torch's bf16 matmuls are the slow path and the kernel takes every chunk."""
    if dtype == torch.bfloat16 and not native_bf16_matmul():
        return 1 << 30
    return limit


def _cpu_signature() -> str:
    """What -march=native depends on: the CPU model and its feature flags."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            lines = [ln for ln in f if ln.startswith(("model name", "flags"))][:2]
        return "".join(lines)
    except OSError:
        return platform.processor() or platform.machine()


def _compiler_version(cxx: str) -> str:
    try:
        return subprocess.run([cxx, "--version"], capture_output=True, text=True,
                              timeout=30).stdout
    except (OSError, subprocess.SubprocessError) as exc:
        raise NativeError(f"cannot run the C++ compiler {cxx}: {exc}") from exc


def build(cxx: Optional[str] = None, openmp: bool = True) -> Path:
    """Compile ``decode_row.cpp`` (unless cached) and return the shared library's path:
    with OpenMP when asked and the compiler supports it, else without."""
    cxx = cxx or compiler()
    if cxx is None:
        raise NativeError("no C++ compiler found (set CXX, or install g++/clang++)")
    version = _compiler_version(cxx)
    if openmp:
        try:
            return _build(cxx, version, flags(True))
        except NativeError:
            pass  # e.g. no omp.h: the kernels then run on the calling thread alone
    return _build(cxx, version, flags(False))


def _build(cxx: str, version: str, opts: tuple[str, ...]) -> Path:
    source = SOURCE.read_bytes() + b"\0" + HEADER.read_bytes()
    key = hashlib.sha256(b"\0".join([source, " ".join(opts).encode(), version.encode(),
                                     _cpu_signature().encode()])).hexdigest()
    target = cache_dir() / f"{key}.so"
    if target.exists():
        return target
    try:
        return _compile(cxx, opts, target)
    except OSError:  # an unwritable cache costs a rebuild per process, not the kernels
        return _compile(cxx, opts, Path(tempfile.mkdtemp(prefix="mythos_rt_cpu_")) / target.name)


def _compile(cxx: str, opts: tuple[str, ...], target: Path) -> Path:
    """Compile into ``target``, whole or not at all (a concurrent build never sees half a
    file); OSError only where ``target``'s directory cannot be written."""
    with replacing(target) as tmp:
        try:
            done = subprocess.run([cxx, *opts, str(SOURCE), "-o", tmp], capture_output=True,
                                  text=True, timeout=300)
        except (OSError, subprocess.SubprocessError) as exc:
            raise NativeError(f"{cxx} could not compile {SOURCE.name}: {exc}") from exc
        if done.returncode != 0:
            raise NativeError(f"{cxx} failed on {SOURCE.name}:\n{done.stderr[-2000:]}")
    return target


def openmp_runtimes(maps: str) -> set[str]:
    """The OpenMP runtimes (GNU, Intel, LLVM) among the files of a /proc/<pid>/maps text."""
    return {line.split()[-1] for line in maps.splitlines()
            if re.search(r"^lib(g|i)?omp[^/]*\.so", line.rsplit("/", 1)[-1])}


def _one_openmp_runtime() -> bool:
    """Whether this process has loaded exactly one OpenMP runtime, i.e. the kernels'
    OpenMP is torch's own thread pool (Linux; elsewhere: unknown, so no). Two runtimes
    would be two pools spinning on the same cores."""
    try:
        return len(openmp_runtimes(Path("/proc/self/maps").read_text())) == 1
    except OSError:
        return False


def _load(path: Path) -> ctypes.CDLL:
    lib = ctypes.CDLL(str(path))
    for name, args in _SIGNATURES.items():
        fn = getattr(lib, name)
        fn.argtypes, fn.restype = args, None
    lib.has_openmp.restype = lib.team_threads.restype = lib.vector_bits.restype = ctypes.c_int32
    for name in ("mla_decode_rows", "mla_decode_rows_bf16", "gqa_decode_rows",
                 "gqa_decode_rows_bf16"):
        getattr(lib, name).restype = ctypes.c_int32
    lib.stream_sum.restype = ctypes.c_float
    lib.set_parallel(1 if lib.has_openmp() and _one_openmp_runtime() else 0)
    return lib


_LIBRARY: dict[str, Optional[ctypes.CDLL]] = {}


def library() -> Optional[ctypes.CDLL]:
    """The loaded kernels, or None (disabled, or unavailable: warned once). Decided on
    first use, once per process (``reset`` forgets it)."""
    try:
        return _LIBRARY["lib"]
    except KeyError:
        pass
    lib, why = None, "MYTHOS_RT_CPU_NATIVE=0"
    if enabled():
        try:
            lib = _load(build())
        except (NativeError, OSError) as exc:
            why = str(exc).splitlines()[0]
            warnings.warn(f"mythos-rt cpu backend: compiled row kernels unavailable "
                          f"({exc}); decode runs its PyTorch paths", stacklevel=2)
    _LIBRARY["lib"], _LIBRARY["why"] = lib, why
    return lib


def describe() -> str:
    """The row kernels in one phrase: compiled and on how many threads, or why not."""
    lib = library()
    if lib is None:
        return f"PyTorch paths ({_LIBRARY.get('why', 'kernels not loaded')})"
    return (f"compiled for -march={march()} ({lib.vector_bits()}-bit vectors), "
            f"{lib.team_threads()} thread(s)")


def reset() -> None:
    """Forget the decision of ``library()`` (tests, or after changing the environment)."""
    _LIBRARY.clear()


class ReadProbe:
    """One pass over ``n_bytes`` of random float32 (random: identical pages could be
    merged by the host, and a zero page reads from nowhere), summed by the row kernels'
    ``stream_sum`` (their team, their vector width, four streams per thread as the matrix
    products read) or, without them, by torch: the read floor a decode token is judged
    against (``bench_runtime_cpu``, ``mythos-rt profile``)."""

    def __init__(self, n_bytes: int):
        self.buf = torch.randn(n_bytes // 4)
        lib = library()
        self.how = ("row kernels' stream_sum (four streams per thread)" if lib is not None
                    else "torch.sum")
        self.run = (lambda: lib.stream_sum(self.buf.data_ptr(), self.buf.numel())) if lib \
            else (lambda: self.buf.sum())

    def __call__(self):
        self.run()

    def gbps(self, seconds: float) -> float:
        return self.buf.numel() * 4 / seconds / 1e9

"""The cpu backend's one-row work has two paths: the compiled kernels
(``mythos_rt.cpu.native``) and the PyTorch ops they replace where no compiler exists.
The kernels have two vector paths: AVX-512 and AVX2 (users have both); the
``compiled-avx2`` runs force the narrower one with ``MYTHOS_RT_CPU_ARCH=x86-64-v3``."""

import platform
from pathlib import Path

import pytest
import torch

from mythos_rt.cpu import native


def has_avx2() -> bool:
    try:
        return " avx2 " in Path("/proc/cpuinfo").read_text() and " fma " in Path(
            "/proc/cpuinfo").read_text()
    except OSError:
        return False


@pytest.fixture
def avx2_build(monkeypatch):
    """The kernels compiled for AVX2 + FMA without AVX-512 (x86-64-v3), whatever this CPU
    has beyond it; forgotten again after the test."""
    if platform.machine() not in ("x86_64", "AMD64") or not has_avx2():
        pytest.skip("not an x86-64 CPU with AVX2 and FMA")
    monkeypatch.setenv("MYTHOS_RT_CPU_ARCH", "x86-64-v3")
    monkeypatch.setattr(native, "_LIBRARY", {})
    lib = native.library()
    assert lib is not None and lib.vector_bits() == 256
    return lib


@pytest.fixture(params=["compiled", "compiled-1-thread", "compiled-avx2", "pytorch"])
def row_path(request, monkeypatch):
    """Run a test with the compiled row kernels (on torch's threads, on the calling
    thread alone, and built for AVX2 only) and without them."""
    if request.param.startswith("compiled"):
        if not native.enabled() or native.compiler() is None:
            pytest.skip("no C++ compiler (or MYTHOS_RT_CPU_NATIVE=0): compiled kernels not built")
        if request.param == "compiled-avx2":
            request.getfixturevalue("avx2_build")
        assert native.library() is not None, "a C++ compiler exists but the kernels did not build"
        if request.param == "compiled-1-thread":
            threads = torch.get_num_threads()
            torch.set_num_threads(1)
            request.addfinalizer(lambda: torch.set_num_threads(threads))
    else:
        monkeypatch.setitem(native._LIBRARY, "lib", None)
    return request.param.split("-")[0]

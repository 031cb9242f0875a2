"""The cpu backend's one-row work has two paths: the compiled kernels
(``mythos_rt.cpu.native``) and the PyTorch ops they replace where no compiler exists."""

import pytest
import torch

from mythos_rt.cpu import native


@pytest.fixture(params=["compiled", "compiled-1-thread", "pytorch"])
def row_path(request, monkeypatch):
    """Run a test with the compiled row kernels (on torch's threads, and on the
    calling thread alone) and without them."""
    if request.param.startswith("compiled"):
        if not native.enabled() or native.compiler() is None:
            pytest.skip("no C++ compiler (or MYTHOS_RT_CPU_NATIVE=0): compiled kernels not built")
        assert native.library() is not None, "a C++ compiler exists but the kernels did not build"
        if request.param == "compiled-1-thread":
            threads = torch.get_num_threads()
            torch.set_num_threads(1)
            request.addfinalizer(lambda: torch.set_num_threads(threads))
    else:
        monkeypatch.setitem(native._LIBRARY, "lib", None)
    return request.param.split("-")[0]

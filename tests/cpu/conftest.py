"""The cpu backend's one-row work has two paths: the compiled kernels
(``mythos_rt.cpu.native``) and the PyTorch ops they replace where no compiler exists."""

import pytest

from mythos_rt.cpu import native


@pytest.fixture(params=["compiled", "pytorch"])
def row_path(request, monkeypatch):
    """Run a test once with the compiled one-row kernels and once without them."""
    if request.param == "compiled":
        if not native.enabled() or native.compiler() is None:
            pytest.skip("no C++ compiler (or MYTHOS_RT_CPU_NATIVE=0): compiled kernels not built")
        assert native.library() is not None, "a C++ compiler exists but the kernels did not build"
    else:
        monkeypatch.setitem(native._LIBRARY, "lib", None)
    return request.param

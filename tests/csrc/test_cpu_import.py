"""A CPU install (no mythos_rt._C, no CuPy) imports and reports the cuda backend clearly."""

import subprocess
import sys

import pytest
import torch

from mythos_rt.ops import registry

CUDA_OPS = ["moe_route", "moe_align", "loop_prologue", "loop_epilogue"]


@pytest.mark.parametrize("op", CUDA_OPS)
def test_cuda_backend_registered(op):
    assert "cuda" in registry.backends_of(op)


@pytest.mark.parametrize("op", CUDA_OPS)
def test_select_cuda_on_cpu_is_a_clear_backend_error(op):
    with pytest.raises(registry.BackendError, match=f"op '{op}': the 'cuda' backend needs a "
                       "CUDA device, got cpu"):
        registry.select(op, "cpu", "cuda")


def test_auto_on_cpu_never_picks_cuda():
    for op in CUDA_OPS:
        assert registry.select(op, "cpu").backend in ("cpu", "torch")


_NO_EXT = r"""
import sys
sys.modules["mythos_rt._C"] = None          # as if never built: `import mythos_rt._C` fails
sys.modules["cupy"] = None                  # and no CuPy
import mythos_rt, mythos_rt.cuda, mythos_rt.cuda.codegen, mythos_rt.cuda.jit
from mythos_rt.ops import registry
assert not mythos_rt.cuda.extension_available()
for op in ("moe_route", "moe_align", "loop_prologue", "loop_epilogue"):
    try:
        registry.select(op, "cpu", "cuda")
    except registry.BackendError as exc:
        assert "needs a CUDA device" in str(exc), exc
    else:
        raise AssertionError(op)
    try:
        registry.load(op, "cuda")
    except registry.BackendError as exc:
        assert "MYTHOS_RT_BUILD_CUDA=1" in str(exc), exc
    else:
        raise AssertionError(op)
    assert registry.select(op, "cpu").backend in ("cpu", "torch")
print("ok")
"""


def test_import_without_extension_or_cupy():
    res = subprocess.run([sys.executable, "-c", _NO_EXT], capture_output=True, text=True,
                         timeout=120)
    assert res.returncode == 0 and res.stdout.strip().endswith("ok"), res.stderr[-3000:]


@pytest.mark.skipif(torch.cuda.is_available(), reason="CPU-only check")
def test_extension_may_exist_but_cpu_tensors_are_rejected():
    pytest.importorskip("mythos_rt._C")
    from mythos_rt.cuda.moe import moe_route_cuda
    x = torch.randn(3, 16)
    with pytest.raises(ValueError, match="needs CUDA tensors"):
        moe_route_cuda(x, torch.randn(8, 16), torch.zeros(8), 2)


@pytest.mark.parametrize("op", CUDA_OPS)
def test_cuda_signatures_extend_torch(op):
    """Same parameters, names and defaults as the torch implementation (extra trailing
    keyword-only-in-practice options such as ``workspace=`` are allowed)."""
    import inspect
    pytest.importorskip("mythos_rt._C", reason="mythos_rt._C not built")
    t_sig = list(inspect.signature(registry.load(op, "torch")).parameters.values())
    c_sig = list(inspect.signature(registry.load(op, "cuda")).parameters.values())
    assert [(p.name, p.default) for p in c_sig[:len(t_sig)]] == \
        [(p.name, p.default) for p in t_sig], op
    assert all(p.default is not inspect.Parameter.empty for p in c_sig[len(t_sig):]), op

"""mythos_rt.cuda.codegen / jit on CPU: specs, generated source, cache keys, no-GPU behaviour."""

import re
import struct

import pytest
import torch

from mythos_rt.config import MythosConfig
from mythos_rt.cuda import codegen, jit
from mythos_rt.cuda.codegen import KERNEL_NAMES, LoopSpec, loop_step_source
from mythos_rt.ops.recurrent import LOOP_THETA
from tests.ops.recurrent_cases import make_ref_loop


def test_spec_from_params():
    cfg = MythosConfig.from_preset("tiny_mla")
    m = make_ref_loop(cfg.dim, rank=cfg.lora_rank, max_loops=cfg.max_loop_iters,
                      thr=cfg.act_threshold)
    p = m.params()
    spec = LoopSpec.from_params(p, torch.float32)
    assert spec == LoopSpec(dim=cfg.dim, rank=cfg.lora_rank, loop_dim=cfg.loop_dim,
                            dtype="float32", eps=1e-6, threshold=cfg.act_threshold)
    assert LoopSpec.from_params(p, torch.bfloat16).vec == 8 and spec.vec == 4


@pytest.mark.parametrize("kw,msg", [(dict(dtype="int8"), "dtype"), (dict(loop_dim=5), "loop_dim"),
                                    (dict(rank=0), "rank")])
def test_spec_validation(kw, msg):
    base = dict(dim=48, rank=4, loop_dim=6, dtype="float32", eps=1e-6, threshold=0.99)
    with pytest.raises(ValueError, match=msg):
        LoopSpec(**{**base, **kw})


def test_source_bakes_constants_and_inlines_headers():
    cfg = MythosConfig.from_preset("mythos_1b")
    spec = LoopSpec(dim=cfg.dim, rank=cfg.lora_rank, loop_dim=cfg.loop_dim, dtype="bfloat16",
                    eps=1e-6, threshold=cfg.act_threshold)
    src = loop_step_source(spec)
    for name in KERNEL_NAMES:
        assert f'extern "C" __global__ void __launch_bounds__(32 * kWarps)\n{name}(' in src
    assert "constexpr int kD = 2048;" in src and "constexpr int kR = 8;" in src
    assert "constexpr int kLoopDim = 256;" in src and "using T = __nv_bfloat16;" in src
    assert '#include "mythos_rt/' not in src          # inlined: the hash covers the headers
    assert src.count("struct EpilogueParams") == 1     # common.cuh inlined once
    assert "#define MYTHOS_RT_DEVICE_ONLY 1" in src
    assert "mythos_rt::epilogue_params<T>(a)" in src   # the headers' one packer
    # float constants round-trip exactly through float32
    thr = re.search(r"kLoopDim, [^,]+f, [^,]+f,\s*([^}]+)f}", src).group(1)
    assert struct.pack("f", float(thr)) == struct.pack("f", 0.99)


def test_cuda_loop_theta_is_the_python_one():
    """The C++ copy of the loop embedding's frequency base equals LOOP_THETA."""
    header = (codegen.include_dir() / "mythos_rt" / "recurrent_step.cuh").read_text()
    found = re.findall(r"constexpr double kLoopTheta = ([0-9.eE+-]+);", header)
    assert [float(v) for v in found] == [LOOP_THETA]


def test_source_is_deterministic_and_spec_sensitive():
    a = LoopSpec(dim=64, rank=4, loop_dim=8, dtype="float16", eps=1e-6, threshold=0.99)
    b = LoopSpec(dim=64, rank=5, loop_dim=8, dtype="float16", eps=1e-6, threshold=0.99)
    assert loop_step_source(a) == loop_step_source(a) != loop_step_source(b)


def test_cache_dir_follows_env(monkeypatch, tmp_path):
    monkeypatch.setenv("MYTHOS_RT_CACHE_DIR", str(tmp_path))
    assert jit.cache_dir() == tmp_path / "nvrtc"


def test_specialize_needs_cuda():
    with pytest.raises(jit.JITError, match="needs a CUDA device"):
        jit.specialize_loop(make_ref_loop(48).params(), torch.float32, "cpu")


def test_prepare_hook_falls_back_to_aot_with_one_warning(monkeypatch):
    """The cuda recurrent step's prepare hook (what the lowering calls): off by the env
    switch, and a JITError (no CuPy/NVRTC) is a warning naming the fallback, never a
    failed compile; either way the prepared form carries no kernels, so the AOT ones run."""
    from mythos_rt.ops.registry import record

    assert record("loop_epilogue", "cuda").prepare == "mythos_rt.cuda.jit:prepare_loop"
    calls = []

    def refuse(*args):
        calls.append(args)
        raise jit.JITError("CuPy is not installed")

    monkeypatch.setattr(jit, "specialize_loop", refuse)
    params = make_ref_loop(48).params()
    monkeypatch.setenv("MYTHOS_RT_CUDA_JIT", "0")
    off = jit.prepare_loop(params)
    assert calls == [] and off.params is params and off.kernels is None
    monkeypatch.delenv("MYTHOS_RT_CUDA_JIT")
    with pytest.warns(UserWarning, match="CuPy is not installed.*ahead-of-time"):
        refused = jit.prepare_loop(params)
    assert len(calls) == 1 and refused.params is params and refused.kernels is None


def test_missing_headers_are_a_clear_error(monkeypatch, tmp_path):
    monkeypatch.setenv("MYTHOS_RT_CSRC_INCLUDE", str(tmp_path))
    with pytest.raises(FileNotFoundError, match="MYTHOS_RT_CSRC_INCLUDE"):
        loop_step_source(LoopSpec(dim=48, rank=4, loop_dim=6, dtype="float32", eps=1e-6,
                                  threshold=0.99))
    assert codegen.include_dir() == tmp_path

"""mythos_rt.cuda.codegen / jit on CPU: specs, generated source, cache keys, no-GPU behaviour."""

import re
import struct

import pytest
import torch

from mythos_rt.config import MythosConfig
from mythos_rt.cuda import codegen, jit
from mythos_rt.cuda.codegen import KERNEL_NAMES, LoopSpec, loop_step_source
from tests.ops.recurrent_cases import make_ref_loop


def test_spec_from_params_and_config_agree():
    cfg = MythosConfig.from_preset("tiny_mla")
    m = make_ref_loop(cfg.dim, rank=cfg.lora_rank, max_loops=cfg.max_loop_iters,
                      thr=cfg.act_threshold)
    p = m.params()
    assert LoopSpec.from_params(p, torch.float32) == LoopSpec.from_config(cfg, torch.float32)
    assert LoopSpec.from_config(cfg, torch.bfloat16).vec == 8
    assert LoopSpec.from_config(cfg, torch.float32).vec == 4


@pytest.mark.parametrize("kw,msg", [(dict(dtype="int8"), "dtype"), (dict(loop_dim=5), "loop_dim"),
                                    (dict(rank=0), "rank")])
def test_spec_validation(kw, msg):
    base = dict(dim=48, rank=4, loop_dim=6, dtype="float32", eps=1e-6, threshold=0.99)
    with pytest.raises(ValueError, match=msg):
        LoopSpec(**{**base, **kw})


def test_source_bakes_constants_and_inlines_headers():
    spec = LoopSpec.from_config(MythosConfig.from_preset("mythos_1b"), torch.bfloat16)
    src = loop_step_source(spec)
    for name in KERNEL_NAMES:
        assert f'extern "C" __global__ void __launch_bounds__(32 * kWarps)\n{name}(' in src
    assert "constexpr int kD = 2048;" in src and "constexpr int kR = 8;" in src
    assert "constexpr int kLoopDim = 256;" in src and "using T = __nv_bfloat16;" in src
    assert '#include "mythos_rt/' not in src          # inlined: the hash covers the headers
    assert src.count("struct EpilogueParams") == 1     # common.cuh inlined once
    assert "#define MYTHOS_RT_DEVICE_ONLY 1" in src
    # float constants round-trip exactly through float32
    thr = re.search(r"p.threshold = ([^;]+)f;", src).group(1)
    assert struct.pack("f", float(thr)) == struct.pack("f", 0.99)


def test_source_is_deterministic_and_spec_sensitive():
    a = LoopSpec(dim=64, rank=4, loop_dim=8, dtype="float16", eps=1e-6, threshold=0.99)
    b = LoopSpec(dim=64, rank=5, loop_dim=8, dtype="float16", eps=1e-6, threshold=0.99)
    assert loop_step_source(a) == loop_step_source(a) != loop_step_source(b)


def test_cache_dir_follows_env(monkeypatch, tmp_path):
    monkeypatch.setenv("MYTHOS_RT_CACHE_DIR", str(tmp_path))
    assert jit.cache_dir() == tmp_path / "nvrtc"


def test_lookup_without_specializations_is_none():
    jit.clear()
    m = make_ref_loop(48)
    assert jit.lookup(m.params(), torch.float32) is None


def test_specialize_needs_cuda():
    with pytest.raises(jit.JITError, match="needs a CUDA device"):
        jit.specialize_loop(make_ref_loop(48).params(), torch.float32, "cpu")


def test_lowering_falls_back_to_aot_with_one_warning(monkeypatch):
    """The compile-time specialization the lowering asks for: off by the env switch, and a
    JITError (no CuPy/NVRTC) is a warning naming the fallback, never a failed compile."""
    from mythos_rt.lower import _specialize_cuda_loop

    calls = []

    def refuse(*args):
        calls.append(args)
        raise jit.JITError("CuPy is not installed")

    monkeypatch.setattr(jit, "specialize_loop", refuse)
    params = make_ref_loop(48).params()
    monkeypatch.setenv("MYTHOS_RT_CUDA_JIT", "0")
    _specialize_cuda_loop(params, torch.bfloat16, torch.device("cuda"))
    assert calls == []
    monkeypatch.delenv("MYTHOS_RT_CUDA_JIT")
    with pytest.warns(UserWarning, match="CuPy is not installed.*ahead-of-time"):
        _specialize_cuda_loop(params, torch.bfloat16, torch.device("cuda"))
    assert len(calls) == 1


def test_missing_headers_are_a_clear_error(monkeypatch, tmp_path):
    monkeypatch.setenv("MYTHOS_RT_CSRC_INCLUDE", str(tmp_path))
    with pytest.raises(FileNotFoundError, match="MYTHOS_RT_CSRC_INCLUDE"):
        loop_step_source(LoopSpec(dim=48, rank=4, loop_dim=6, dtype="float32", eps=1e-6,
                                  threshold=0.99))
    assert codegen.include_dir() == tmp_path

"""Every CUDA source compiles for sm_90a and sm_80 without a GPU (docs/design.md "CPU and GPU").

AOT: the CMake build of mythos_rt._C compiles every csrc/*.cu with both -gencode flags
(shared with test_ext_args via the ``built_so`` fixture). JIT: the generated recurrent-
step source (mythos_rt.cuda.codegen) for tiny_mla/fp32 and mythos_1b/bf16 (plus an
fp16 width that is not a multiple of the vector width) compiles with nvcc -c, in
parallel. Skipped where nvcc is not on PATH.
"""

import re
import shutil
import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

from mythos_rt.config import MythosConfig
from mythos_rt.cuda.codegen import LoopSpec, loop_step_source
from mythos_rt.ops.norm import NORM_EPS

from ._build import GENCODE, ROOT, nvcc

needs_nvcc = pytest.mark.skipif(nvcc() is None, reason="needs nvcc on PATH")


def test_cmake_lists_every_cu_source():
    listed = set(re.findall(r"csrc/(\w+\.(?:cu|cpp))", (ROOT / "CMakeLists.txt").read_text()))
    on_disk = {p.name for p in (ROOT / "csrc").glob("*.cu")} | {"bindings.cpp"}
    assert listed == on_disk


@needs_nvcc
def test_every_cu_compiles_for_sm90a_and_sm80(built_so):
    from ._build import BUILD_DIR
    flags = (BUILD_DIR / "CMakeFiles" / "_C.dir" / "flags.make").read_text()
    for g in GENCODE:
        assert g in flags, f"{g} missing from the CUDA flags:\n{flags}"
    for cu in (ROOT / "csrc").glob("*.cu"):
        assert (BUILD_DIR / "CMakeFiles" / "_C.dir" / "csrc" / f"{cu.name}.o").is_file(), cu
    tool = shutil.which("cuobjdump") or str(Path(nvcc()).parent / "cuobjdump")
    if not Path(tool).exists():
        pytest.skip("cuobjdump not found next to nvcc (the build itself compiled every .cu)")
    res = subprocess.run([tool, "--list-elf", str(built_so)], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    archs = set(re.findall(r"sm_(\d+a?)", res.stdout))
    assert {"90a", "80"} <= archs, res.stdout
    n_cu = len(list((ROOT / "csrc").glob("*.cu")))
    assert res.stdout.count("sm_90a") >= n_cu and res.stdout.count("sm_80") >= n_cu


JIT_CASES = [("tiny_mla", torch.float32), ("mythos_1b", torch.bfloat16)]


def _compile(src: str, path) -> subprocess.CompletedProcess:
    path.write_text(src)
    return subprocess.run([nvcc(), "-std=c++17", "-c", *GENCODE, str(path), "-o",
                           str(path.with_suffix(".o"))], capture_output=True, text=True)


@needs_nvcc
def test_generated_sources_compile(tmp_path):
    cfgs = [(MythosConfig.from_preset(n), str(dt).replace("torch.", "")) for n, dt in JIT_CASES]
    specs = [LoopSpec(dim=c.dim, rank=c.lora_rank, loop_dim=c.loop_dim, dtype=dt, eps=NORM_EPS,
                      threshold=c.act_threshold) for c, dt in cfgs]
    # fp16, D=52 (not a multiple of 8): the scalar (VEC=1) specialization
    specs.append(LoopSpec(dim=52, rank=3, loop_dim=6, dtype="float16", eps=1e-6, threshold=0.9))
    assert specs[1].vec == 8 and specs[2].vec == 1
    with ThreadPoolExecutor(len(specs)) as pool:
        results = list(pool.map(lambda i: _compile(loop_step_source(specs[i]),
                                                   tmp_path / f"gen{i}.cu"), range(len(specs))))
    for spec, res in zip(specs, results):
        assert res.returncode == 0, f"{spec}:\n{res.stderr[-4000:]}"

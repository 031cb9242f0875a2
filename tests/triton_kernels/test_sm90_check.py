"""The static sm_90a verification (``python -m mythos_rt.triton_kernels.sm90_check``).

CI runs the bf16 subset that guards the decode path of the real presets: every launch of
mythos_1b and mythos_3b at decode batches 1 and 64 and a prefill chunk, compiled by
Triton's NVIDIA pipeline down to ptxas for an sm_90 stand-in target (no GPU), must
compile, fit shared memory, and not spill on the decode path. The full sweep (every
preset, bf16 and fp16, batches 1-64, prefill up to 8192 cached tokens, the MoE autotune
candidates) writes docs/kernels-sm90.md.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import triton

REPO = Path(__file__).resolve().parents[2]
PTXAS = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas"
needs_ptxas = pytest.mark.skipif(not PTXAS.exists(), reason="triton wheel without its ptxas")


def _run(*args: str, timeout: int = 900) -> subprocess.CompletedProcess:
    env = dict(os.environ, TRITON_INTERPRET="0")
    return subprocess.run([sys.executable, "-m", "mythos_rt.triton_kernels.sm90_check", *args],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)


@needs_ptxas
def test_bf16_decode_path_of_the_real_presets_compiles_without_spills():
    r = _run("--presets", "mythos_1b", "mythos_3b", "--dtypes", "bf16", "--batches", "1", "64",
             "--candidates")
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-2000:]
    out = r.stdout
    for kernel in ("_split_kv_kernel", "_flash_kernel", "_epilogue_kernel", "_gemm1_kernel",
                   "_align_scan_kernel", "_mla_cache_write_kernel", "_rmsnorm_kernel"):
        assert kernel in out, f"{kernel} was never launched"
    assert "0 with problems" in out


@needs_ptxas
def test_problems_are_reported_and_fail_the_run(tmp_path):
    """The gate itself: a compile error, too much shared memory, a decode-path spill."""
    code = (
        "import os; os.environ['TRITON_INTERPRET'] = '0'\n"
        "import torch, triton, triton.language as tl\n"
        "from mythos_rt.triton_kernels.sm90_check import StaticCompiler, Compiled, SMEM_LIMIT\n"
        "@triton.jit\n"
        "def broken(x_ptr, BLOCK: tl.constexpr):\n"
        "    tl.store(x_ptr + tl.arange(0, BLOCK), undefined_name)\n"
        "with StaticCompiler() as sc:\n"
        "    sc.case('c', 'decode', 'bf16')\n"
        "    broken[(1,)](torch.empty(16, device='meta'), BLOCK=16)\n"
        "(rec,) = sc.results.values()\n"
        "assert rec.error and 'undefined_name' in rec.error, rec\n"
        "assert Compiled('k', '', 'bf16', spills=8, paths={'decode'}).problems()\n"
        "assert not Compiled('k', '', 'bf16', spills=8, paths={'autotune'}).problems()\n"
        "assert not Compiled('k', '', 'fp16', spills=8, paths={'decode'}).problems()\n"
        "assert Compiled('k', '', 'fp16', smem=SMEM_LIMIT + 1, paths={'prefill'}).problems()\n"
        "print('gate ok')\n")
    script = tmp_path / "gate.py"  # @triton.jit needs its source in a file
    script.write_text(code)
    r = subprocess.run([sys.executable, str(script)], cwd=REPO, capture_output=True, text=True,
                       env=dict(os.environ, TRITON_INTERPRET="0"), timeout=300)
    assert r.returncode == 0 and "gate ok" in r.stdout, r.stdout + r.stderr[-3000:]

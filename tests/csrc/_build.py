"""Build helpers shared by the csrc tests: nvcc/cmake discovery and the test build of _C.

The test build lives in ``build/tests-csrc`` (git-ignored) and is incremental: the
first run compiles every csrc/*.cu for sm_90a and sm_80 (about a minute on 2 cores),
later runs only what changed (CMake tracks the headers).
"""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
GENCODE = ("-gencode=arch=compute_90a,code=sm_90a", "-gencode=arch=compute_80,code=sm_80")
BUILD_DIR = ROOT / "build" / "tests-csrc"


def nvcc() -> str | None:
    return shutil.which("nvcc")


def cmake() -> str | None:
    return shutil.which("cmake")


def build_extension() -> Path:
    """Configure + build mythos_rt._C with CMake; return the built module's path."""
    import pybind11
    BUILD_DIR.mkdir(parents=True, exist_ok=True)
    out = BUILD_DIR / "out"
    cfg = [cmake(), str(ROOT), "-DCMAKE_BUILD_TYPE=Release", f"-DPython_EXECUTABLE={sys.executable}",
           f"-DCMAKE_CUDA_COMPILER={nvcc()}", f"-DMYTHOS_RT_OUTPUT_DIR={out}",
           f"-Dpybind11_DIR={pybind11.get_cmake_dir()}"]
    if not (BUILD_DIR / "CMakeCache.txt").exists():
        _run(cfg, BUILD_DIR)
    _run([cmake(), "--build", ".", "-j", str(max(2, os.cpu_count() or 2))], BUILD_DIR)
    found = glob.glob(str(out / "_C*.so"))
    assert found, f"no _C module in {out}"
    return Path(found[0])


def _run(cmd, cwd) -> None:
    res = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)
    if res.returncode:
        raise AssertionError(f"{' '.join(map(str, cmd))} failed:\n{res.stdout[-4000:]}\n"
                             f"{res.stderr[-4000:]}")


def load_module(path: Path):
    """Import a built _C from ``path`` without touching ``mythos_rt._C``."""
    import importlib.util
    spec = importlib.util.spec_from_file_location("_C", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod

"""Build mythos-rt: the Python packages always, the CUDA extension only when asked.

`triton_kernels/` and `graphs/` install as `mythos_rt.triton_kernels` and
`mythos_rt.graphs` so that we never shadow OpenAI's top-level `triton_kernels`.
The `mythos_rt._C` extension (csrc/, built by CMake) is compiled only when
MYTHOS_RT_BUILD_CUDA=1 and `nvcc` is found; otherwise the install is pure Python and
says so once.
"""

import os
import shutil
import subprocess
import sys

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = os.path.dirname(os.path.abspath(__file__))


def _want_cuda_extension() -> bool:
    return os.environ.get("MYTHOS_RT_BUILD_CUDA", "0") == "1" and shutil.which("nvcc") is not None


class CMakeBuild(build_ext):
    """Configure and build csrc/ with CMake into ``get_ext_fullpath``'s directory.

    setuptools then packs it into the wheel, or, for editable installs (``pip install
    -e .``, which set ``inplace``), copies it next to the sources as ``mythos_rt/_C*.so``.
    CMake's build tree lives in ``build_temp`` so rebuilds are incremental.
    """

    def build_extension(self, ext):
        out_dir = os.path.dirname(os.path.abspath(self.get_ext_fullpath(ext.name)))
        os.makedirs(out_dir, exist_ok=True)
        build_tmp = os.path.join(os.path.abspath(self.build_temp), "cmake")
        os.makedirs(build_tmp, exist_ok=True)
        import pybind11

        cfg = ["-DCMAKE_BUILD_TYPE=Release", f"-DPython_EXECUTABLE={sys.executable}",
               f"-DCMAKE_CUDA_COMPILER={shutil.which('nvcc')}",
               f"-DMYTHOS_RT_OUTPUT_DIR={out_dir}",
               f"-Dpybind11_DIR={pybind11.get_cmake_dir()}"]
        if os.environ.get("MYTHOS_RT_CUDA_GENCODE"):
            cfg.append(f"-DMYTHOS_RT_CUDA_GENCODE={os.environ['MYTHOS_RT_CUDA_GENCODE']}")
        subprocess.check_call(["cmake", ROOT, *cfg], cwd=build_tmp)
        subprocess.check_call(["cmake", "--build", ".", "-j", str(os.cpu_count() or 2)],
                              cwd=build_tmp)
        built = self.get_ext_filename(ext.name).split(os.sep)[-1]
        if not os.path.exists(os.path.join(out_dir, built)):
            raise RuntimeError(f"CMake did not produce {built} in {out_dir}")


ext_modules, cmdclass = [], {}
if _want_cuda_extension():
    ext_modules = [Extension("mythos_rt._C", sources=[])]
    cmdclass = {"build_ext": CMakeBuild}
elif "egg_info" not in sys.argv and "dist_info" not in sys.argv:
    print("mythos-rt: no CUDA extension built (set MYTHOS_RT_BUILD_CUDA=1 with nvcc on "
          "PATH to build mythos_rt._C); the torch, cpu and Triton backends are unaffected.",
          file=sys.stderr)

setup(
    name="mythos-rt",
    version="0.1.0",
    description="Compiler and runtime for OpenMythos recurrent-depth transformers",
    long_description=open(os.path.join(ROOT, "README.md"), encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=["mythos_rt", "mythos_rt.ops", "mythos_rt.cpu", "mythos_rt.cuda", "mythos_rt.triton_kernels",
              "mythos_rt.graphs"],
    package_dir={"mythos_rt": "mythos_rt", "mythos_rt.triton_kernels": "triton_kernels",
                 "mythos_rt.graphs": "graphs"},
    # compiled on first use by mythos_rt.cpu.native, on the machine that runs it
    package_data={"mythos_rt.cpu": ["decode_row.cpp", "row_math.h"],
                  # the trained demo model (scripts/train_demo_model.py)
                  "mythos_rt": ["assets/*/config.json", "assets/*/model.safetensors",
                                "assets/*/mythos_tokenizer.json"]},
    # No upper caps: the code uses nothing newer than torch 2.11 / triton 3.6 and CI runs the
    # interpreted kernels under the newest Triton too (scripts/bootstrap.sh, .venv-newest);
    # a cap would make pip downgrade a user's newer torch, whose CUDA build brings the
    # Triton it was built with.
    install_requires=[
        "torch>=2.11",
        "triton>=3.6",
        "numpy",
        "safetensors",
        "tokenizers",
        "nvidia-ml-py",
        "pybind11",
    ],
    extras_require={"test": ["pytest"]},
    entry_points={"console_scripts": ["mythos-rt = mythos_rt.cli:main"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)

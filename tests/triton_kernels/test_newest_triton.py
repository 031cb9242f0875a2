"""The interpreted kernel tests again under the newest Triton (and numpy).

The test environment pins triton 3.6, the language the GPU machines compile; users'
CUDA torch builds bring newer Tritons whose interpreter is stricter (3.9 rejects a
block mask combined with a scalar comparison). scripts/bootstrap.sh builds
``.venv-newest`` (newest triton + numpy over the pinned .venv); this runs the
interpreted tests of this folder in it, in a subprocess, as part of the suite CI runs.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]
NEWEST = REPO / ".venv-newest" / "bin" / "python"


def _version(python: Path) -> tuple[int, ...]:
    out = subprocess.run([str(python), "-c", "import triton; print(triton.__version__)"],
                         capture_output=True, text=True, timeout=120, check=True)
    return tuple(int(x) for x in out.stdout.strip().split("+")[0].split(".")[:2])


@pytest.mark.skipif(torch.cuda.is_available(), reason="GPU machines run the compiled kernels")
@pytest.mark.skipif(not NEWEST.exists(), reason="no .venv-newest (scripts/bootstrap.sh builds "
                    "it; MYTHOS_RT_NEWEST=0 skipped it)")
def test_interpreted_kernels_under_newest_triton():
    import triton
    pinned = tuple(int(x) for x in triton.__version__.split(".")[:2])
    newest = _version(NEWEST)
    if newest <= pinned:
        pytest.skip(f"the newest Triton installed ({newest}) is the pinned one ({pinned})")
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    here = Path(__file__).parent
    # not this test, nor the static sm_90 compile (it checks the GPU machines' Triton 3.6)
    skip = [f"--ignore={here / name}" for name in (Path(__file__).name, "test_sm90_check.py")]
    proc = subprocess.run([str(NEWEST), "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider",
                           str(here), *skip], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=900)
    tail = (proc.stdout + proc.stderr)[-4000:]
    assert proc.returncode == 0, f"kernel tests fail under triton {newest}:\n{tail}"

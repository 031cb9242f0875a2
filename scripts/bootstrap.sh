#!/usr/bin/env bash
# Create .venv (once) and install mythos-rt with its test environment into it.
# Idempotent: a second run only checks what is installed.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
.venv/bin/python -m pip install -q --disable-pip-version-check -r requirements-dev.txt
.venv/bin/python -m pip install -q --disable-pip-version-check --no-build-isolation -e . 2>&1 \
  | grep -v '^\s*$' || true
# open-mythos is the parity oracle; its own pins (torch==2.11, transformers, datasets) are
# not needed to import open_mythos/main.py, so it is installed without dependencies.
.venv/bin/python -m pip install -q --disable-pip-version-check --no-deps open-mythos==0.5.0
if ! .venv/bin/python -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('mythos_rt._C') is None)" 2>/dev/null; then
  echo "mythos-rt: installed without the CUDA extension mythos_rt._C (build it with MYTHOS_RT_BUILD_CUDA=1 and nvcc); the torch, cpu and Triton backends are unaffected." >&2
fi
# .venv-newest: the newest Triton and numpy over the pinned .venv, for the interpreted
# kernel tests (tests/triton_kernels/test_newest_triton.py runs them in it). It adds only
# triton and numpy; everything else (torch, mythos-rt, pytest) comes from .venv through a
# .pth file. torch stays the pinned CPU wheel: the package index's newest Linux torch is a
# CUDA build of several GB. MYTHOS_RT_NEWEST=0 skips it.
if [ "${MYTHOS_RT_NEWEST:-1}" = 1 ]; then
  if [ ! -x .venv-newest/bin/python ]; then
    "$PY" -m venv .venv-newest
  fi
  .venv-newest/bin/python -m pip install -q --disable-pip-version-check --upgrade triton numpy
  pinned=$(.venv/bin/python -c "import site; print(site.getsitepackages()[0])")
  newest=$(.venv-newest/bin/python -c "import site; print(site.getsitepackages()[0])")
  echo "import site; site.addsitedir('$pinned')" > "$newest/zz_pinned_venv.pth"
fi

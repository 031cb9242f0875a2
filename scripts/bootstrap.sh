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

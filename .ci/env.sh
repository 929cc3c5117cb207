#!/usr/bin/env bash
# Set up .venv with everything nova_fast needs: on a fresh machine, or again (idempotent).
# torch: the CPU build 2.13.0 (taken from the local wheel where one lies on disk), or the CUDA build
# from PyPI where an NVIDIA GPU is visible. Then the package (editable) with its dev extras; the
# CUDA extension nova_fast._C is built only where CUDA torch and nvcc are both present.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
. .venv/bin/activate
python -m pip install -q --upgrade pip >/dev/null
if ! python -c "import torch" 2>/dev/null; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    python -m pip install -q torch
  else
    python -m pip install -q torch==2.13.0
  fi
fi
python -m pip install -q -e '.[dev]' 2>&1 | grep -v -E "^\s*$|DEPRECATION|setuptools|!!|\*\*\*\*" || true
python -c "import nova_fast, torch; print(f'nova_fast {nova_fast.__version__} ready: torch {torch.__version__}')"

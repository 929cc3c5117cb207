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
# The lent GPU machine's versions, for the checks that need no GPU (nova_fast/testing/): triton 3.6
# beside the venv's own (every Triton kernel is AOT-compiled with both), and torch 2.11's C++ headers
# with the cuBLAS / cuSPARSE / cuSOLVER headers its ATen/cuda headers include (the extension's torch
# glue, csrc/*.cpp, is compiled against them, syntax only). Fetched once (~190 MB and ~1.3 GB of
# wheels, of which only the headers are kept), under .venv/; a failed fetch warns and the tests that
# need them say what is missing.
COMPAT_TRITON=3.6.0
COMPAT_TORCH=2.11.0
COMPAT_CUDA_WHEELS="nvidia-cublas==13.1.0.3 nvidia-cusparse==12.6.3.3 nvidia-cusolver==12.0.4.66"  # torch 2.11's cuda-toolkit 13.0.2
if [ ! -f ".venv/triton-$COMPAT_TRITON/triton/__init__.py" ]; then
  rm -rf ".venv/triton-$COMPAT_TRITON.part"
  if python -m pip install -q --no-deps --target ".venv/triton-$COMPAT_TRITON.part" "triton==$COMPAT_TRITON"; then
    mv ".venv/triton-$COMPAT_TRITON.part" ".venv/triton-$COMPAT_TRITON"
  else
    echo "warning: triton $COMPAT_TRITON not fetched; its AOT compile checks will fail until .ci/env.sh succeeds" >&2
  fi
fi
HEADERS=".venv/torch-$COMPAT_TORCH-headers"
if [ ! -f "$HEADERS/.complete" ]; then
  rm -rf "$HEADERS"
  WHEELS=$(mktemp -d)
  # shellcheck disable=SC2086
  if python -m pip download -q --no-deps --only-binary=:all: -d "$WHEELS" "torch==$COMPAT_TORCH" $COMPAT_CUDA_WHEELS; then
    python - "$WHEELS" "$HEADERS" <<'PY'
import sys, zipfile
from pathlib import Path

wheels, dest = Path(sys.argv[1]), Path(sys.argv[2])
for wheel in sorted(wheels.glob("*.whl")):
    with zipfile.ZipFile(wheel) as z:
        for name in z.namelist():
            # torch/include/... -> torch/...; nvidia/cu13/include/... -> cuda/...
            for prefix, into in (("torch/include/", "torch"), ("nvidia/cu13/include/", "cuda")):
                if name.startswith(prefix) and not name.endswith("/"):
                    target = dest / into / name[len(prefix):]
                    target.parent.mkdir(parents=True, exist_ok=True)
                    target.write_bytes(z.read(name))
(dest / ".complete").write_text("\n".join(w.name for w in sorted(wheels.glob("*.whl"))) + "\n")
PY
  else
    echo "warning: torch $COMPAT_TORCH headers not fetched; the bindings' header check will fail until .ci/env.sh succeeds" >&2
  fi
  rm -rf "$WHEELS"
fi
python -c "import nova_fast, torch; print(f'nova_fast {nova_fast.__version__} ready: torch {torch.__version__}')"

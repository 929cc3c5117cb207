#!/usr/bin/env bash
# The prepared device check: on a GPU machine with no network, in at most 8 minutes, install
# nova_fast into the machine's python, build nova_fast._C for the local GPU, run the GPU tests, the
# bench on osp480 shapes and ncu on the spatial encoder's kernels; everything goes to OUT_DIR
# (logs/, bench/, tests/, ncu/, status.json, summary.md). Each stage has its own time budget and a
# failing stage does not stop the next. --dry-run walks every stage on any machine (CPU is fine).
#
#   bash bench/gpu_check.sh OUT_DIR [--dry-run] [--stages a,b] [--archs 90] [--gen-sizes 1x16x10]
#
# The python used is $PYTHON, else python3 (on the lent GPU machine: the one holding torch).
# The stages and their commands live in nova_fast/testing/gpu_check.py (run as a plain script,
# since nova_fast is not installed yet when this starts).
set -uo pipefail
# no cd: OUT_DIR is taken relative to the caller's directory; the stages run in the repository root
CHECK="$(cd "$(dirname "$0")/.." && pwd)/nova_fast/testing/gpu_check.py"
PY=${PYTHON:-python3}
if [ $# -lt 1 ] || [ "$1" = "-h" ] || [ "$1" = "--help" ]; then
  exec "$PY" "$CHECK" --help
fi
exec "$PY" "$CHECK" --python "$PY" "$@"

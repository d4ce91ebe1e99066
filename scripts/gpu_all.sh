#!/usr/bin/env bash
# Every GPU row of docs/PERFORMANCE.md in one call, inside a time budget (default 8 minutes):
#   bash scripts/gpu_all.sh OUTDIR                      # on the GPU machine, wheels from .whl/
#   bash scripts/gpu_all.sh --device cpu --tiny OUTDIR  # the same stages at tiny shapes on a CPU (CI)
# Stages, limits and output files: scripts/gpu_all.py (this wrapper only picks the interpreter:
# $PYTHON, else python3, which on the GPU image is the one that holds torch).
set -euo pipefail
exec "${PYTHON:-python3}" "$(dirname "${BASH_SOURCE[0]}")/gpu_all.py" "$@"

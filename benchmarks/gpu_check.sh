#!/usr/bin/env bash
# The GPU check: build, test and time every CUDA and Triton kernel in one run (docs/gpu.md).
#   bash benchmarks/gpu_check.sh --out gpu-check-results [--skip-build] [--dry-run]
set -euo pipefail
python=$(command -v python || command -v python3)
exec "$python" "$(dirname "$0")/gpu_check.py" "$@"

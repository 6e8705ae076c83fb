#!/usr/bin/env bash
# The GPU check on a machine with one NVIDIA GPU, offline: the GPU tests, precision, the cost of guided sampling at
# 512x512 in float16, LGP training throughput. Writes OUTPUT_DIR/gpu_check.json and gpu_check.md (default: gpu_check).
# Run from a clone with the project installed (pip install -e ".[test]"); any further arguments go to
# benchmarks/gpu_check.py (for example --sections tests precision).
set -euo pipefail
cd "$(dirname "$0")/.."
output_dir="${1:-gpu_check}"
shift $(( $# > 0 ? 1 : 0 ))
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
# Nothing is downloaded: every model is built from a config or shipped in the package.
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
exec python3 -m benchmarks.gpu_check --output_dir "$output_dir" "$@"

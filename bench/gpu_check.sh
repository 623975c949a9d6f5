#!/usr/bin/env bash
# The GPU check in one command, for a machine with one NVIDIA GPU (an H100: under 8 minutes):
#   bash bench/gpu_check.sh            # conformance on CUDA + train step against PEFT, bench/results/gpu_check_cuda.json
#   bash bench/gpu_check.sh --dry-run  # its first step, tiny, on the CPU (the test suite runs this)
# Set-up: scripts/setup.sh installs the CPU build of torch; on the GPU machine use a CUDA build of
# the same torch release (pip install torch==2.13.0 from the CUDA index) and, for the
# flash_attention_2 cells, pip install flash-attn.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -x .venv/bin/python ] && [ -z "${VIRTUAL_ENV:-}" ]; then
  . .venv/bin/activate
fi
export HF_HUB_OFFLINE=1
# prefix methods on flash_attention_2 are refused until this check has passed on a GPU; here they run
export PSTAR_UNVERIFIED_KERNELS=flash_attention_2
if [ "${1:-}" = "--dry-run" ]; then
  shift
  out=$(mktemp -d)/gpu_check_dry.json
  exec python bench/gpu_check.py --dry-run --out "$out" "$@"
fi
exec python bench/gpu_check.py "$@"

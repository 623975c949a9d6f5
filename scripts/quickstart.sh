#!/usr/bin/env bash
# The main job, offline: prompt tuning of frozen SmolLM2-135M-Instruct on a packaged SST-2 sample,
# zero-shot vs tuned accuracy on SST-2 dev, adapter + metrics + plot in runs/quickstart.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
export HF_HUB_OFFLINE=1
# accelerate launch gives each process one CPU thread unless told otherwise
accelerate launch --num_processes 1 --num_machines 1 --mixed_precision no --dynamo_backend no \
  --num_cpu_threads_per_process "$(nproc)" \
  -m pstar_plugins.train --method prompt-tuning --model smollm2 --output-dir runs/quickstart --overwrite "$@"

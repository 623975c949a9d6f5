#!/usr/bin/env bash
# Set up (if needed) and run the whole test suite under the pinned versions (what CI runs).
#   bash scripts/test.sh --latest   # the same under the newest allowed releases, with a report (scripts/latest.sh)
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "${1:-}" = "--latest" ]; then
  shift
  exec bash scripts/latest.sh "$@"
fi
bash scripts/setup.sh
. .venv/bin/activate
export HF_HUB_OFFLINE=1
# the pinned formatter and linter first (seconds): `ruff format .` and `ruff check --fix .` repair most
ruff format --check --quiet . || { echo "ruff format --check failed: run ruff format ." >&2; exit 1; }
ruff check --quiet .
python -m pytest -q "$@"

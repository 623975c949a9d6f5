#!/usr/bin/env bash
# Try the newest releases pyproject.toml allows, in .venv-latest, and print what changed against
# the pins in constraints.txt: versions, tests that fail, matrix cells whose verdict moved.
#
#   bash scripts/test.sh --latest            # the whole suite (what the pins are moved forward with)
#   bash scripts/test.sh --latest -k matrix  # extra arguments go to pytest
#
# To move the pins after a clean report: python scripts/freeze_pins.py .venv-latest/bin/python,
# then python -m tests.matrix --write if cells moved, and commit both.
set -uo pipefail
cd "$(dirname "$0")/.."
rm -rf .venv-latest
bash scripts/setup.sh --latest || exit 1
. .venv-latest/bin/activate
export HF_HUB_OFFLINE=1
REPORT=.venv-latest/report
mkdir -p "$REPORT"
rm -f "$REPORT/matrix.jsonl"
PSTAR_MATRIX_OBSERVED="$REPORT/matrix.jsonl" python -m pytest -q -p no:cacheprovider --junitxml="$REPORT/junit.xml" "$@" \
  | tee "$REPORT/pytest.log"
status=${PIPESTATUS[0]}
python scripts/latest_report.py --junit "$REPORT/junit.xml" --matrix "$REPORT/matrix.jsonl" --python .venv-latest/bin/python
echo "pytest exit status under the newest releases: $status"
exit "$status"

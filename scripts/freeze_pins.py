"""Write constraints.txt from a virtual environment's installed packages.

    python scripts/freeze_pins.py .venv-latest/bin/python   # after scripts/latest.sh has passed

Every distribution the environment holds is pinned (pip, setuptools and the transitive
dependencies included), except pstar-plugins itself; torch loses its local label (``+cpu``) so
the pin matches the CPU wheel that scripts/setup.sh installs.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
HEADER = """\
# The tested versions of everything scripts/setup.sh installs (so CI and both README commands).
# pyproject.toml keeps ranges for people who install the library into their own environment;
# this file decides what a fresh clone gets. Move it forward only through a passing
# `bash scripts/test.sh --latest`, then `python scripts/freeze_pins.py .venv-latest/bin/python`.
"""


def frozen(python: str) -> list[str]:
    out = subprocess.run(
        [python, "-m", "pip", "freeze", "--all", "--exclude-editable"], check=True, capture_output=True, text=True
    ).stdout
    pins = []
    for line in out.splitlines():
        line = line.strip()
        if not line or line.startswith("#") or "==" not in line:
            continue  # editable or direct-URL installs are not pins
        name, version = line.split("==", 1)
        if name.lower().replace("_", "-") == "pstar-plugins":
            continue
        pins.append(f"{name}=={version.split('+', 1)[0]}")
    return sorted(pins, key=str.lower)


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print(__doc__, file=sys.stderr)
        return 2
    pins = frozen(argv[0])
    (ROOT / "constraints.txt").write_text(HEADER + "\n".join(pins) + "\n")
    print(f"wrote constraints.txt: {len(pins)} pins from {argv[0]}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

"""Print what the newest allowed releases change against the pins (scripts/latest.sh calls it).

Three parts: packages whose version differs from constraints.txt; tests that failed or errored
(from pytest's JUnit XML); matrix cells whose observed verdict differs from
tests/matrix_record.json, which holds the verdicts under the pins.
"""

from __future__ import annotations

import argparse
import json
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

from freeze_pins import frozen  # noqa: E402


def _pins(path: Path) -> dict[str, str]:
    out = {}
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if "==" in line:
            name, version = line.split("==", 1)
            out[name.lower().replace("_", "-")] = version
    return out


def version_changes(python: str) -> list[str]:
    pinned = _pins(ROOT / "constraints.txt")
    latest = {k.lower().replace("_", "-"): v for k, v in (p.split("==", 1) for p in frozen(python))}
    lines = []
    for name in sorted(set(pinned) | set(latest)):
        old, new = pinned.get(name), latest.get(name)
        if old != new:
            lines.append(f"{name}: {old or '(not installed)'} → {new or '(not installed)'}")
    return lines


def failed_tests(junit: Path) -> tuple[list[str], dict[str, int]]:
    if not junit.is_file():
        return [f"(no JUnit report at {junit}: pytest did not finish)"], {}
    root = ET.parse(junit).getroot()
    failed, counts = [], {"passed": 0, "failed": 0, "skipped": 0}
    for case in root.iter("testcase"):
        name = f"{case.get('classname', '').replace('.', '/')}.py::{case.get('name')}"
        problem = case.find("failure")
        if problem is None:
            problem = case.find("error")
        if problem is not None:
            counts["failed"] += 1
            message = (problem.get("message") or "").strip().splitlines()
            failed.append(f"{name}: {message[0][:200] if message else problem.tag}")
        elif case.find("skipped") is not None:
            counts["skipped"] += 1
        else:
            counts["passed"] += 1
    return failed, counts


def matrix_moves(observed_path: Path) -> tuple[list[str], int]:
    from tests.matrix import moved, recorded

    if not observed_path.is_file():
        return [], 0
    record = recorded()
    observations = [json.loads(line) for line in observed_path.read_text().splitlines() if line.strip()]
    changes = [moved(o, record.get((o["architecture"], o["method"]))) for o in observations]
    return [c for c in changes if c], len(observations)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--junit", type=Path, required=True)
    parser.add_argument("--matrix", type=Path, required=True)
    parser.add_argument("--python", required=True, help="the interpreter of the environment with the newest releases")
    args = parser.parse_args()

    print("\n== newest allowed releases against constraints.txt ==")
    versions = version_changes(args.python)
    print("\n".join(f"  {line}" for line in versions) if versions else "  no version differs from the pins")
    failed, counts = failed_tests(args.junit)
    print(
        f"\n== tests: {counts.get('passed', 0)} passed, {counts.get('failed', 0)} failed, "
        f"{counts.get('skipped', 0)} skipped =="
    )
    print("\n".join(f"  FAILED {line}" for line in failed) if failed else "  no test failed")
    moves, ran = matrix_moves(args.matrix)
    print(f"\n== matrix: {ran} cells ran; verdicts against tests/matrix_record.json ==")
    print("\n".join(f"  {line}" for line in moves) if moves else "  no cell's verdict moved")
    return 0


if __name__ == "__main__":
    sys.exit(main())

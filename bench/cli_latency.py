"""Wall time of the commands a user types first: ``pstar --help``, ``pstar methods``,
``pstar train --help`` and an argument error (each a fresh process; best and median of N runs).

    python bench/cli_latency.py            # prints a table; exits 1 if a median is over --limit
    python bench/cli_latency.py --runs 5 --limit 2.0
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
COMMANDS = {
    "pstar --help": ["--help"],
    "pstar methods": ["methods"],
    "pstar train --help": ["train", "--help"],
    "pstar train --method prompt-tuning --help": ["train", "--method", "prompt-tuning", "--help"],
    "pstar eval --help": ["eval", "--help"],
    "argument error (--learnig-rate)": [
        "train",
        "--method",
        "prompt-tuning",
        "--learnig-rate",
        "0.1",
        "--output-dir",
        "unused",
    ],
}


def time_command(argv: list[str], runs: int) -> tuple[list[float], int]:
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    times, code = [], 0
    for _ in range(runs):
        start = time.perf_counter()
        result = subprocess.run(
            [sys.executable, "-m", "pstar_plugins.cli", *argv], capture_output=True, env=env, cwd=ROOT
        )
        times.append(time.perf_counter() - start)
        code = result.returncode
    return times, code


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=3, help="runs per command")
    parser.add_argument("--limit", type=float, default=2.0, help="seconds a median may take")
    args = parser.parse_args()
    over = False
    print(f"{'command':<45} {'exit':>4} {'best s':>7} {'median s':>9}")
    for name, argv in COMMANDS.items():
        times, code = time_command(argv, args.runs)
        median = statistics.median(times)
        over |= median > args.limit
        print(f"{name:<45} {code:>4} {min(times):>7.2f} {median:>9.2f}")
    return 1 if over else 0


if __name__ == "__main__":
    raise SystemExit(main())

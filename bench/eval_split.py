"""Evaluation split between ranks: the final SST-2 dev evaluation of one process against two, side by side.

Runs ``pstar train`` (prompt tuning, SmolLM2-135M-Instruct, one training step, no periodic
evaluation, a learning rate too small to move the prompt, so both score the same tensors) through
``accelerate launch`` with ``single_process.yaml`` and ``ddp.yaml``, one CPU thread per process,
and reads the final evaluation's wall time and accuracy from each run's metrics.json. Each rank of
two scores half of the batches one process scores, so the time should about halve and the accuracy
must be the same.

    python bench/eval_split.py                  # writes bench/results/eval_split.json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

import _common as C  # noqa: E402


def run(config: str, out: Path, rows: int, batch: int) -> dict:
    cmd = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--config_file",
        str(ROOT / "integrations" / "accelerate" / f"{config}.yaml"),
        "--mixed_precision",
        "no",
        "--num_cpu_threads_per_process",
        "1",
        "-m",
        "pstar_plugins.train",
        "--method",
        "prompt-tuning",
        "--model",
        "smollm2",
        "--output-dir",
        str(out),
        "--max-steps",
        "1",
        "--batch-size",
        "2",
        "--learning-rate",
        "1e-12",
        "--eval-steps",
        "0",
        "--no-zero-shot",
        "--plot",
        "",
        "--max-eval-samples",
        str(rows),
        "--eval-batch-size",
        str(batch),
    ]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    result = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if result.returncode:
        raise SystemExit(result.stderr[-3000:])
    return json.loads((out / "metrics.json").read_text())


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=872, help="SST-2 dev rows to score (872: all)")
    parser.add_argument("--eval-batch-size", type=int, default=16)
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        one = run("single_process", Path(tmp) / "one", args.rows, args.eval_batch_size)
        two = run("ddp", Path(tmp) / "two", args.rows, args.eval_batch_size)
    ratio = two["final_eval_seconds"] / one["final_eval_seconds"]
    print(
        f"final evaluation of {args.rows} rows: 1 process {one['final_eval_seconds']:.1f} s, 2 processes "
        f"{two['final_eval_seconds']:.1f} s ({ratio:.2f}x); accuracy {one['tuned_accuracy']:.4f} vs "
        f"{two['tuned_accuracy']:.4f}"
    )
    payload = {
        "rows": args.rows,
        "eval_batch_size": args.eval_batch_size,
        "threads_per_process": 1,
        "one_process": {"seconds": one["final_eval_seconds"], "accuracy": one["tuned_accuracy"]},
        "two_processes": {"seconds": two["final_eval_seconds"], "accuracy": two["tuned_accuracy"]},
        "time_ratio": ratio,
        "identical_accuracy": one["tuned_accuracy"] == two["tuned_accuracy"],
    }
    if not args.no_write:
        print("wrote", C.write_result("eval_split", payload))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

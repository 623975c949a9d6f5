"""``bash bench/gpu_check.sh --dry-run``: the GPU check's first step, tiny, on the CPU, so the
script that a GPU machine runs cannot rot where no GPU is."""

import json
import os
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_check_dry_run_passes_its_first_cell_and_bench_step(tmp_path):
    out = tmp_path / "gpu_check.json"
    result = subprocess.run(
        ["bash", str(ROOT / "bench" / "gpu_check.sh"), "--dry-run", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    record = json.loads(out.read_text())
    assert record["dry_run"] is True and record["device"] == "cpu"
    (cell,) = record["conformance"]
    assert (cell["family"], cell["method"], cell["backend"], cell["result"]) == (
        "llama",
        "prompt-tuning",
        "sdpa",
        "passes",
    )
    for method in ("prompt-tuning", "prefix-tuning"):
        row = record["train_step"][method]
        assert row["ours"]["median_seconds"] > 0 and row["peft"]["median_seconds"] > 0
        assert row["ours"]["loss"] == row["ours"]["loss"]  # finite, not NaN

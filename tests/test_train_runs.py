"""Real ``pstar train`` processes on the tiny model folder: the output folder's lock, reruns,
--overwrite, checkpoint limits, resume bounds, and the one stored P-tuning template."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT), "PSTAR_DISABLE_PLUGIN_AUTOLOAD": "1"}


def _command(tiny_dir, out, *extra, method=("prompt-tuning", "--num-virtual-tokens", "2")):
    return [
        sys.executable,
        "-m",
        "pstar_plugins.train",
        "--model",
        str(tiny_dir),
        "--output-dir",
        str(out),
        "--method",
        *method,
        "--batch-size",
        "2",
        "--max-train-samples",
        "16",
        "--max-eval-samples",
        "4",
        "--eval-steps",
        "0",
        "--no-zero-shot",
        "--plot",
        "",
        *extra,
    ]


def _train(tiny_dir, out, *extra):
    return subprocess.run(
        _command(tiny_dir, out, *extra), capture_output=True, text=True, env=ENV, cwd=ROOT, timeout=600
    )


@pytest.mark.slow
def test_a_second_run_into_a_busy_folder_exits_2_naming_the_first_ones_pid(tiny_dir, tmp_path):
    out = tmp_path / "run"
    first = subprocess.Popen(
        _command(tiny_dir, out, "--max-steps", "100000"),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        env=ENV,
        cwd=ROOT,
    )
    try:
        deadline = time.monotonic() + 300
        while not (out / ".pstar-run.lock").exists():
            assert first.poll() is None, first.stderr.read()[-3000:]
            assert time.monotonic() < deadline, "the first run never took its lock"
            time.sleep(0.2)
        second = _train(tiny_dir, out, "--max-steps", "2")
        assert second.returncode == 2, second.stderr[-3000:]
        assert f"is in use by another run (PID {first.pid} on" in second.stderr
        assert "Traceback" not in second.stderr
        assert first.poll() is None  # the first run goes on
    finally:
        first.kill()  # SIGKILL: no clean-up, so its lock file stays behind, stale
        first.wait()
    assert json.loads((out / ".pstar-run.lock").read_text())["pid"] == first.pid
    third = _train(tiny_dir, out, "--max-steps", "2")
    assert third.returncode == 0, third.stderr[-3000:]
    assert f"taking over the stale lock {out / '.pstar-run.lock'} of PID {first.pid}" in third.stderr
    assert not (out / ".pstar-run.lock").exists()  # released at the end
    assert (out / "adapter" / "adapter.safetensors").is_file()


@pytest.mark.slow
def test_reruns_overwrite_checkpoint_limit_and_resume_bounds(tiny_dir, tmp_path):
    out = tmp_path / "run"
    first = _train(tiny_dir, out, "--max-steps", "3", "--checkpointing-steps", "1", "--checkpoints-total-limit", "2")
    assert first.returncode == 0, first.stderr[-3000:]
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-3"]  # the newest two
    adapter = (out / "adapter" / "adapter.safetensors").read_bytes()

    again = _train(tiny_dir, out, "--max-steps", "3")
    assert again.returncode == 2 and "holds a finished run (adapter, metrics.json); pass --overwrite" in again.stderr
    assert (out / "adapter" / "adapter.safetensors").read_bytes() == adapter  # nothing lost

    backwards = _train(tiny_dir, out, "--max-steps", "2", "--resume-from-checkpoint", "latest")
    assert backwards.returncode == 2, backwards.stderr[-3000:]
    assert "checkpoint-3 is at step 3, past --max-steps 2; pass --max-steps 3 or more" in backwards.stderr

    onwards = _train(tiny_dir, out, "--max-steps", "4", "--resume-from-checkpoint", "latest")
    assert onwards.returncode == 0, onwards.stderr[-3000:]
    assert "resumed from" in onwards.stderr and "at step 3" in onwards.stderr
    assert json.loads((out / "metrics.json").read_text())["history"]["step"] == [1, 2, 3, 4]

    replaced = _train(tiny_dir, out, "--max-steps", "2", "--overwrite")
    assert replaced.returncode == 0, replaced.stderr[-3000:]
    assert not list(out.glob("checkpoint-*"))  # the old run's checkpoints went with it
    assert json.loads((out / "metrics.json").read_text())["history"]["step"] == [1, 2]


@pytest.mark.slow
def test_a_p_tuning_template_with_newlines_is_stored_once_converted(tiny_dir, tmp_path):
    out = tmp_path / "run"
    result = subprocess.run(
        _command(
            tiny_dir,
            out,
            "--max-steps",
            "1",
            "--template",
            "{soft:2} Review: {sentence}\\nSentiment:{answer}",
            method=("p-tuning", "--encoder", "mlp"),
        ),
        capture_output=True,
        text=True,
        env=ENV,
        cwd=ROOT,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "step 1/1: loss" in result.stderr and "\r" not in result.stderr  # a log line, no progress-bar spam
    assert "Setting accelerator to CPU" not in result.stderr and "Loading weights" not in result.stderr
    assert f"files written:\n    {out / 'adapter'}/\n    {out / 'metrics.json'}\n" in result.stdout
    meta = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert (
        meta["method_config"]["template"]
        == meta["task"]["template"]
        == "{soft:2} Review: {sentence}\nSentiment:{answer}"
    )
    # pstar eval without --model: the adapter's recorded base model (the default SmolLM2 would be
    # refused by hidden size)
    evaluated = subprocess.run(
        [
            sys.executable,
            "-m",
            "pstar_plugins.evaluate",
            "--adapter",
            str(out / "adapter"),
            "--max-eval-samples",
            "4",
            "--output",
            str(tmp_path / "eval.json"),
        ],
        capture_output=True,
        text=True,
        env=ENV,
        cwd=ROOT,
        timeout=600,
    )
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    scores = json.loads((tmp_path / "eval.json").read_text())
    assert scores["model"] == str(tiny_dir) and scores["template"] == meta["task"]["template"]
    assert scores["runs"][0]["accuracy"] == json.loads((out / "metrics.json").read_text())["tuned_accuracy"]

"""Interrupted runs and failing ranks: nothing is lost, nothing hangs."""

import json
import math
import os
import signal
import subprocess
import sys
import time

import pytest

from pstar_plugins.contract.errors import ConfigError
from pstar_plugins.train.run_dir import checkpoint_to_resume
from tests.test_train_entry_point import ROOT, _train, needs_model


def test_resume_picks_the_latest_complete_checkpoint(tmp_path):
    for step in (2, 4, 6):
        (tmp_path / f"checkpoint-{step}").mkdir()
    (tmp_path / "checkpoint-2" / "trainer_state.json").write_text("{}")
    (tmp_path / "checkpoint-4" / "trainer_state.json").write_text("{}")
    # checkpoint-6 was being written when the process died: no trainer_state.json
    assert checkpoint_to_resume("latest", tmp_path) == tmp_path / "checkpoint-4"
    assert checkpoint_to_resume("latest-if-any", tmp_path / "nothing-here") is None
    with pytest.raises(ConfigError, match="no complete checkpoint"):
        checkpoint_to_resume("latest", tmp_path / "nothing-here")
    with pytest.raises(ConfigError, match="not a complete checkpoint"):
        checkpoint_to_resume(str(tmp_path / "checkpoint-6"), tmp_path)


@pytest.mark.slow
@needs_model
def test_nan_loss_stops_the_run_and_keeps_the_last_good_checkpoint(tiny_dir, tmp_path):
    # raw prefix keys pushed to ~1e30 overflow the attention scores: the loss becomes NaN
    result = _train(
        tiny_dir,
        tmp_path / "run",
        "--method",
        "prefix-tuning",
        "--projection",
        "false",
        "--learning-rate",
        "1e30",
        "--warmup-steps",
        "0",
        "--max-grad-norm",
        "0",
        "--checkpointing-steps",
        "1",
        "--max-steps",
        "6",
    )
    assert result.returncode == 2
    assert "loss became" in result.stderr and "lower --learning-rate" in result.stderr
    complete = sorted(p.name for p in (tmp_path / "run").glob("checkpoint-*") if (p / "trainer_state.json").exists())
    assert complete, "the checkpoint written before the loss went bad must be kept"
    for name in complete:  # each kept checkpoint holds the losses of every step up to it, all finite
        state = json.loads((tmp_path / "run" / name / "trainer_state.json").read_text())
        losses = state["history"]["loss"]
        assert len(losses) == state["step"] == int(name.split("-")[-1])
        assert all(math.isfinite(v) for v in losses), losses


@pytest.mark.slow
@needs_model
def test_killing_one_rank_ends_the_other_quickly_naming_the_lost_rank(tiny_dir, tmp_path):
    import psutil

    out = tmp_path / "run"
    cmd = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--config_file",
        str(ROOT / "integrations/accelerate/ddp.yaml"),
        "--main_process_port",
        "29577",
        "-m",
        "pstar_plugins.train",
        "--method",
        "prompt-tuning",
        "--model",
        str(tiny_dir),
        "--output-dir",
        str(out),
        "--max-steps",
        "100000",
        "--batch-size",
        "2",
        "--max-train-samples",
        "32",
        "--max-eval-samples",
        "4",
        "--eval-steps",
        "0",
        "--no-zero-shot",
        "--plot",
        "",
        "--dist-timeout",
        "30",
    ]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    launcher = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.time() + 120
        while not (out / "run.json").exists() and time.time() < deadline:  # written when training starts
            time.sleep(0.2)
        assert (out / "run.json").exists(), "training did not start"
        time.sleep(2)
        workers = [
            p
            for p in psutil.Process(launcher.pid).children(recursive=True)
            if "pstar_plugins.train" in " ".join(p.cmdline())
        ]
        victim = next(p for p in workers if p.environ().get("RANK") == "1")
        victim.send_signal(signal.SIGKILL)
        # a survivor waiting on the lost rank forever would hang here: --dist-timeout 30 ends it
        output, _ = launcher.communicate(timeout=90)
    finally:
        if launcher.poll() is None:
            launcher.kill()
    assert launcher.returncode != 0
    assert "rank      : 1" in output or "rank 1" in output, output[-3000:]

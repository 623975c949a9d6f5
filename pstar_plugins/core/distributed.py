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


GATHER_LOG: list[list[int]] = []
"""Ids of the parameters each :func:`gathered` call materialised (tests assert on it)."""


@contextlib.contextmanager
def gathered(params: Iterable[torch.Tensor], modifier_rank: int | None = None) -> Iterator[None]:
    """Temporarily materialise ZeRO-3 partitioned ``params`` (all ranks must enter).

    This is the only place the library gathers partitions. ``modifier_rank`` set: changes made
    on that rank are broadcast to the shards when the block ends.
    """
    params = [p for p in params if is_partitioned(p)]
    if not params:
        yield
        return
    import deepspeed

    GATHER_LOG.append([id(p) for p in params])

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


def gathered_trainable_state(model) -> dict[str, torch.Tensor]:
    """The method's trainable state as full CPU tensors, gathering only trainable partitions.

    Every rank must call it (the gather is a collective); no frozen weight is gathered, unlike
    ``accelerator.get_state_dict`` with ``stage3_gather_16bit_weights_on_model_save`` which
    gathers the whole model (transformers#29980).
    """
    params = [p for p in model.method.parameters()]
    with gathered(params):
        return {k: v.detach().to("cpu", copy=True) for k, v in model.raw_trainable_state().items()}


def load_trainable_state_gathered(model, state) -> None:
    params = [p for p in model.method.parameters()]
    with gathered(params, modifier_rank=0):
        model.raw_load_trainable_state(state)

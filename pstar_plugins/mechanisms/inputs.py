"""Helpers shared by methods that change the input sequence or need position ids."""

from __future__ import annotations

import functools
import inspect
from typing import Any

import torch
from torch import nn

IGNORE_INDEX = -100


@functools.lru_cache(maxsize=None)
def _forward_parameters(cls: type) -> frozenset[str]:
    return frozenset(inspect.signature(cls.forward).parameters)


def accepts(model: nn.Module, argument: str) -> bool:
    """Whether ``model.forward`` takes ``argument`` explicitly."""
    return argument in _forward_parameters(type(model))


def is_encoder_decoder(model: nn.Module) -> bool:
    return bool(getattr(model.config, "is_encoder_decoder", False))


def positions_from_mask(mask: torch.Tensor) -> torch.Tensor:
    """Position ids that skip padding (the convention of ``generate()``): ``cumsum(mask) - 1``."""
    positions = mask.long().cumsum(-1) - 1
    return positions.masked_fill(mask == 0, 0)


def _find_position_convention(model: nn.Module) -> tuple[int, int]:
    for name, module in model.named_modules():
        if name.rsplit(".", 1)[-1] in ("position_embeddings", "embed_positions") and isinstance(module, nn.Embedding):
            if module.padding_idx is not None:
                return module.padding_idx + 1, module.padding_idx
            return 0, 0
    return 0, 0


def position_convention(model: nn.Module) -> tuple[int, int]:
    """``(first, padding)``: the position id of a row's first real token and of padding.

    ``(0, 0)`` for most models. Learned position tables with a padding row (the fairseq
    convention of RoBERTa, XLM-RoBERTa, CamemBERT, ...: ``nn.Embedding(..., padding_idx=p)``)
    number real tokens from ``p + 1`` and give padding ``p``; filling them from 0 would shift every
    position silently.
    """
    key = model.__dict__.get("_pstar_position_convention")
    if key is None:
        key = _find_position_convention(model)
        model.__dict__["_pstar_position_convention"] = key
    return key


def fill_position_ids(model: nn.Module, inputs: dict[str, Any]) -> None:
    """Give a padded batch the positions each row would have alone (left padding included), in
    the model's own numbering (:func:`position_convention`)."""
    if inputs.get("position_ids") is not None or inputs.get("attention_mask") is None:
        return
    if is_encoder_decoder(model) or not accepts(model, "position_ids"):
        return
    mask = inputs["attention_mask"]
    first, padding = position_convention(model)
    positions = positions_from_mask(mask)
    if first or padding:
        positions = (positions + first).masked_fill(mask == 0, padding)
    inputs["position_ids"] = positions


def first_real_index(mask: torch.Tensor) -> torch.Tensor:
    """Index of the first non-padding token of each row, ``(B,)``."""
    return mask.long().argmax(dim=-1)


def insert_block(seq: torch.Tensor, block: torch.Tensor, at: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Insert ``block`` (``(B, m, *rest)``) into ``seq`` (``(B, L, *rest)``) before index ``at[b]``.

    Returns the new ``(B, L+m, *rest)`` tensor and ``user_index`` ``(B, L)``: where each original
    position went, used to line outputs up with the user's tokens.
    """
    B, L = seq.shape[:2]
    m = block.shape[1]
    device = seq.device
    j = torch.arange(L, device=device).unsqueeze(0)  # (1, L)
    user_index = j + m * (j >= at.unsqueeze(1)).long()  # (B, L)
    out = seq.new_zeros((B, L + m, *seq.shape[2:]))
    rest = (1,) * (seq.dim() - 2)
    out.scatter_(1, user_index.view(B, L, *rest).expand_as(seq), seq)
    block_index = at.unsqueeze(1) + torch.arange(m, device=device).unsqueeze(0)  # (B, m)
    out = out.scatter(1, block_index.view(B, m, *rest).expand(B, m, *seq.shape[2:]), block.to(seq.dtype))
    return out, user_index


def gather_positions(tensor: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``tensor[b, index[b, j]]`` for a ``(B, T, ...)`` tensor and ``(B, L)`` index."""
    B, L = index.shape
    rest = tensor.shape[2:]
    return tensor.gather(1, index.view(B, L, *([1] * len(rest))).expand(B, L, *rest))


def cache_argument(model) -> str:
    """The name ``model``'s forward takes a KV cache under (transformers renamed
    ``past_key_values`` to ``cache`` in later 5.x versions)."""
    return "cache" if accepts(model, "cache") else "past_key_values"

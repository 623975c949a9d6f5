"""Rotating keys as if they sat at another position, for models with rotary position embeddings.

Our prefixes live in post-rotary key space and have no position; PEFT's sit in the KV cache at
positions ``0 .. m-1`` and push the real tokens to ``m, m+1, ...``. With RoPE a query at
position ``m+i`` against key ``R(m)k`` scores the same as a query at ``i`` against ``k``, so a
prefix converts exactly by rotating its keys ``m`` positions (and back).
"""

from __future__ import annotations

import sys

import torch
from torch import nn

from pstar_plugins.contract.errors import IncompatibleModelError


def rotary_of(base_model: nn.Module):
    """``(rotary module, apply_rotary_pos_emb)`` of a RoPE model, or ``None``."""
    rotary = getattr(getattr(base_model, "base_model", base_model), "rotary_emb", None)
    if rotary is None:
        return None
    for module in base_model.modules():
        apply = getattr(sys.modules[type(module).__module__], "apply_rotary_pos_emb", None)
        if apply is not None:
            return rotary, apply
    return None


def rotate_keys(base_model: nn.Module, keys: torch.Tensor, shift: int) -> torch.Tensor:
    """Rotate keys ``(N, L, n_kv, m, d)`` as if they sat at position ``shift`` (negative: undo)."""
    found = rotary_of(base_model)
    if found is None:
        raise IncompatibleModelError(
            f"{type(base_model).__name__} has no rotary position embedding: PEFT's prefixes shift the real tokens' "
            "positions by the prefix length, which only rotary models can compensate; this adapter cannot be "
            "converted exactly."
        )
    rotary, apply = found
    N, L, H, m, d = keys.shape
    flat = keys.reshape(N * L, H, m, d).float()
    position = torch.full((1, m), abs(shift), dtype=torch.long, device=flat.device)
    cos, sin = rotary(flat, position)
    if shift < 0:
        sin = -sin  # R(-m) = R(m)^T
    rotated, _ = apply(flat, flat, cos.to(flat.dtype), sin.to(flat.dtype))
    return rotated.reshape(N, L, H, m, d)

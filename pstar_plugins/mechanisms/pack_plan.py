"""Where every real token of a padded batch goes in a padding-free call: the plan (first-fit
decreasing bins under a cost model), the masks that keep each example to itself for each kernel,
and the moves between the two layouts. Why and when a call is packed:
:mod:`pstar_plugins.mechanisms.packing`."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from pstar_plugins.mechanisms.attention_kernels import varlen_kwargs_from_lengths


def attention_kernel(model: nn.Module) -> str | None:
    """The attention implementation ``model`` was loaded with."""
    return getattr(model.config, "_attn_implementation", None)


@dataclass
class PackPlan:
    """Where every real token of the padded ``(B, L)`` batch goes in the packed ``(R, C)`` one."""

    batch: torch.Tensor  # (T,) source row of each real token, in row-major order
    column: torch.Tensor  # (T,) source column
    bin: torch.Tensor  # (T,) packed row
    offset: torch.Tensor  # (T,) packed column
    shape: tuple[int, int]  # (R, C)
    source_shape: tuple[int, int]  # (B, L)
    segment: torch.Tensor  # (R, C) source row + 1 at every packed position, 0 at padding
    cost: float  # :func:`cost` of the packed call
    source_column: torch.Tensor  # (R, C) source column of every packed position (0 at padding)

    @property
    def tokens(self) -> int:
        return int(self.batch.numel())

    @property
    def unpadded(self) -> bool:
        """Every bin holds one whole example and no padding (a batch without padding packs so):
        the packed call is then plain causal attention and needs no mask at all."""
        rows, width = self.shape
        return self.tokens == rows * width and rows == self.source_shape[0]


def _first_fit_decreasing(lengths: list[int], capacity: int) -> tuple[list[tuple[int, int]], list[int]]:
    fills: list[int] = []
    where = [(0, 0)] * len(lengths)
    for b in sorted(range(len(lengths)), key=lambda b: -lengths[b]):
        for r, fill in enumerate(fills):
            if fill + lengths[b] <= capacity:
                where[b] = (r, fill)
                fills[r] += lengths[b]
                break
        else:
            where[b] = (len(fills), 0)
            fills.append(lengths[b])
    return where, fills


def cost(rows: int, width: int, pair_cost: float) -> float:
    """Relative cost of a call on ``rows × width`` positions: linear layers cost one unit per
    position, attention ``pair_cost`` per query-key pair (dense within a row)."""
    return rows * width * (1.0 + width * pair_cost)


def pair_cost(config) -> float:
    """Attention cost of one query-key pair relative to one position through a layer's linear
    maps: about ``4h`` against ``2 × (4h² + 3h·i)`` multiply-adds (Llama-style layer, GPT-2 close)."""
    h = getattr(config, "hidden_size", None) or getattr(config, "n_embd", None) or 1024
    i = getattr(config, "intermediate_size", None) or getattr(config, "n_inner", None) or 4 * h
    return 2.0 / (4 * h + 3 * i)


def plan(mask: torch.Tensor, attention_pair_cost: float = 0.0, one_row: bool = False) -> PackPlan:
    """Pack the rows' real positions (``mask == 1``, in order; they need not be contiguous).

    Bins start as long as the longest row and double while that lowers :func:`cost`: short
    rows fill long bins better, but attention within a bin grows with its square. ``one_row``:
    every token in one bin, for kernels whose variable-length path keeps attention within each
    example by itself (flash_attention_2's ``cu_seqlens``), so nothing is padded at all.
    """
    B, L = mask.shape
    real = mask.bool()
    lengths = real.sum(1).tolist()
    capacity = max(sum(lengths) if one_row else max(lengths), 1)
    best = None
    while True:
        where, fills = _first_fit_decreasing(lengths, capacity)
        estimate = cost(len(fills), max(fills), attention_pair_cost)
        if best is None or estimate < best[0]:
            best = (estimate, where, fills)
        if len(fills) == 1:
            break
        capacity *= 2
    estimate, where, fills = best
    batch, column = real.nonzero(as_tuple=True)  # row-major: each row's tokens in order
    device = mask.device
    start = torch.tensor([where[b][1] for b in range(B)], device=device)
    bins = torch.tensor([where[b][0] for b in range(B)], device=device)
    rank = real.long().cumsum(1) - 1  # index of each real token within its row
    offset = start[batch] + rank[batch, column]
    bin_ = bins[batch]
    R, C = len(fills), max(fills)
    segment = torch.zeros(R, C, dtype=torch.long, device=device)
    segment[bin_, offset] = batch + 1
    source_column = torch.zeros(R, C, dtype=torch.long, device=device)
    source_column[bin_, offset] = column
    return PackPlan(batch, column, bin_, offset, (R, C), (B, L), segment, estimate, source_column)


def masks(p: PackPlan, model: nn.Module, dtype: torch.dtype):
    """The packed call's attention mask: one block mask, windowed when every layer slides, or one
    per layer type (``config.layer_types``) when the family takes them as a dict; ``None`` when the
    plan is :attr:`PackPlan.unpadded`, so that attention runs with ``is_causal`` and no mask (the
    model builds its own sliding-window mask where a layer needs one), as the plain call would."""
    kernel = attention_kernel(model)
    if p.unpadded or kernel == "flash_attention_2":  # flash: cu_seqlens instead (varlen_kwargs)
        return None
    config = model.config
    window = getattr(config, "sliding_window", None)
    types = set(getattr(config, "layer_types", None) or ())
    if kernel == "flex_attention":
        if "sliding_attention" in types:
            return {"full_attention": flex_block_mask(p), "sliding_attention": flex_block_mask(p, window)}
        return flex_block_mask(p, window if not types else None)
    boolean = kernel == "sdpa"
    if "sliding_attention" in types:
        full = block_mask(p, dtype, boolean)
        return {"full_attention": full, "sliding_attention": block_mask(p, dtype, boolean, window)}
    return block_mask(p, dtype, boolean, window if not types else None)


def block_mask(p: PackPlan, dtype: torch.dtype, boolean: bool, window: int | None = None) -> torch.Tensor:
    """``(R, 1, C, C)``: a query sees the earlier tokens of its own example (with ``window``: only
    those fewer than ``window`` columns back in the padded batch, transformers' sliding-window
    rule). A padding query sees itself only, so no softmax row is empty (an empty row would give
    NaN that reaches real positions through the values)."""
    seg = p.segment
    C = seg.shape[1]
    causal = torch.ones(C, C, dtype=torch.bool, device=seg.device).tril()
    allowed = (seg[:, :, None] == seg[:, None, :]) & causal & (seg[:, None, :] != 0)
    if window is not None:
        column = p.source_column
        allowed &= (column[:, :, None] - column[:, None, :]) < window
    allowed |= torch.eye(C, dtype=torch.bool, device=seg.device)
    allowed = allowed[:, None]
    if boolean:
        return allowed
    return torch.zeros(allowed.shape, dtype=dtype, device=seg.device).masked_fill(~allowed, torch.finfo(dtype).min)


def flex_block_mask(p: PackPlan, window: int | None = None):
    """:func:`block_mask`'s pattern as a flex_attention ``BlockMask`` over ``(R, C, C)``: the same
    rule evaluated on the plan's segments, so whole blocks of other examples are skipped rather
    than masked (compiled on CUDA, evaluated directly elsewhere)."""
    from torch.nn.attention.flex_attention import create_block_mask

    seg, column = p.segment, p.source_column
    rows, width = p.shape

    def mask_mod(b, h, q, kv):
        allowed = (seg[b, q] == seg[b, kv]) & (seg[b, kv] != 0) & (kv <= q)
        if window is not None:
            allowed = allowed & (column[b, q] - column[b, kv] < window)
        return allowed | (q == kv)

    return create_block_mask(mask_mod, rows, None, width, width, device=seg.device, _compile=seg.device.type == "cuda")


def varlen_kwargs(p: PackPlan, model: nn.Module) -> dict[str, Any]:
    """For flash_attention_2: the examples' boundaries in the one packed row, as transformers'
    variable-length kwargs (``cu_seq_lens_q/k``, ``max_length_q/k``; what its
    ``DataCollatorWithFlattening`` passes). Other kernels: none (the mask says it)."""
    if attention_kernel(model) != "flash_attention_2":
        return {}
    if p.shape[0] != 1:
        raise ValueError("flash_attention_2's packed call needs a one-row plan (plan(..., one_row=True))")
    _, counts = torch.unique_consecutive(p.segment[0], return_counts=True)
    return varlen_kwargs_from_lengths(counts)


def pack(p: PackPlan, values: torch.Tensor, fill=0) -> torch.Tensor:
    """``(B, L, *rest)`` → ``(R, C, *rest)``; differentiable in ``values``."""
    out = values.new_full((*p.shape, *values.shape[2:]), fill)
    return out.index_put((p.bin, p.offset), values[p.batch, p.column])


def unpack(p: PackPlan, values: torch.Tensor) -> torch.Tensor:
    """``(R, C, *rest)`` → ``(B, L, *rest)`` with zeros at padding; differentiable."""
    out = values.new_zeros((*p.source_shape, *values.shape[2:]))
    return out.index_put((p.batch, p.column), values[p.bin, p.offset])

"""Sizes checked before any memory is spent: options that size tensors (virtual tokens, the prefix
projection, batch × length) against the model's position limit and a byte estimate.

Only the model's config is read (never its weights). The estimate is deliberately rough (it counts
the method's tensors with their gradient and AdamW state, and the attention scores of one layer
of one step); it exists to refuse values off by orders of magnitude in one line, before a
traceback from the allocator minutes later, not to predict a run's peak.
"""

from __future__ import annotations

from dataclasses import dataclass

from pstar_plugins.contract.errors import ConfigError

#: bytes per trainable element: fp32 value, gradient, and AdamW's two moments
TRAINING_BYTES = 4 * 4


@dataclass(frozen=True)
class ModelShape:
    hidden: int
    layers: int
    heads: int
    positions: int | None  # the position limit, for families that have one

    @classmethod
    def of(cls, config) -> "ModelShape":
        text = config.get_text_config() if hasattr(config, "get_text_config") else config

        def first(*names, default=None):
            return next((int(getattr(text, n)) for n in names if getattr(text, n, None)), default)

        return cls(
            hidden=first("hidden_size", "n_embd", "d_model", default=1),
            layers=first("num_hidden_layers", "n_layer", "num_layers", default=1),
            heads=first("num_attention_heads", "n_head", "num_heads", default=1),
            positions=first("max_position_embeddings", "n_positions", "max_seq_len"),
        )


def _gib(n: float) -> str:
    return f"{n / 2**30:,.1f} GiB"


def available_bytes() -> tuple[int, str]:
    """Memory a run can still take, and where: the first CUDA device's free memory, else the
    host's available memory."""
    try:
        import torch

        if torch.cuda.is_available():
            return int(torch.cuda.mem_get_info()[0]), "free on the GPU"
    except Exception:  # a broken CUDA set-up: the host's memory is still a bound
        pass
    import psutil

    return int(psutil.virtual_memory().available), "available on this machine"


def check(
    config, model_config, in_sequence: bool, batch_size: int, max_length: int, available: tuple[int, str] | None = None
) -> None:
    """Refuse sizes that cannot fit, naming the option and the fix.

    ``config``: the method's config (its ``num_virtual_tokens``, ``num_tasks`` and prefix
    projection, where it has them); ``in_sequence``: the method's virtual tokens take positions
    of the input (prompt tuning, P-tuning) rather than key/value columns (prefix methods).
    """
    shape = ModelShape.of(model_config)
    m = int(getattr(config, "num_virtual_tokens", 0) or 0)
    tasks = int(getattr(config, "num_tasks", 1) or 1)
    # (examples shorter than --max-length are the rule, so only a prompt that leaves no room is refused)
    if in_sequence and shape.positions is not None and m >= shape.positions:
        raise ConfigError(
            f"--num-virtual-tokens {m:,} leaves no position for the input: the model has {shape.positions:,} "
            f"(max_position_embeddings) and the prompt takes {m:,} of them. Use fewer virtual tokens."
        )
    if in_sequence:
        elements = tasks * m * shape.hidden
    else:  # a key and a value per layer, or P' through the MLP
        elements = tasks * m * 2 * shape.layers * shape.hidden
        if getattr(config, "projection", False):
            width = int(getattr(config, "projection_hidden_size", 0) or 0)
            elements += tasks * m * shape.hidden + width * (shape.hidden + 2 * shape.layers * shape.hidden)
    tensors = elements * TRAINING_BYTES
    columns = max_length + m
    scores = batch_size * shape.heads * (max_length + (m if in_sequence else 0)) * columns * 4  # one layer, fp32
    free, where = available if available is not None else available_bytes()
    need = tensors + scores
    if need > free:
        what = f"--num-virtual-tokens {m:,}" if m else "the method's options"
        parts = (
            f"{_gib(tensors)} for the method's tensors with their gradients and optimizer state, {_gib(scores)} "
            "for one layer's attention scores"
        )
        raise ConfigError(
            f"{what} with --batch-size {batch_size} and --max-length {max_length} needs about {_gib(need)} "
            f"({parts}); {_gib(free)} is {where}. Use fewer virtual tokens, a smaller --batch-size "
            "or a shorter --max-length"
            + (", or a smaller --projection-hidden-size" if getattr(config, "projection", False) else "")
            + "."
        )

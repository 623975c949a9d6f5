"""Shapes a method needs, read from the model config. The prefix geometry itself comes from the
attention-site probe (``mechanisms.attention.probe_attention_calls``: the keys and values the sites
really compute; under ZeRO-3 the probe gathers one module's weights at a time); the config
readers here serve the layer-count check, the PEFT exporter and adapters' hidden size."""

from __future__ import annotations

from dataclasses import asdict, dataclass

from transformers import PretrainedConfig

from pstar_plugins.contract.errors import IncompatibleModelError

# the kinds of attention site (``mechanisms.attention`` finds them; a prefix table per kind)
SELF = "self"  # decoder-only or encoder-only self-attention
ENCODER = "encoder"  # encoder self-attention of an encoder-decoder model
DECODER = "decoder"  # decoder self-attention of an encoder-decoder model
CROSS = "cross"  # decoder cross-attention over the encoder output


@dataclass(frozen=True)
class AttentionGeometry:
    """Key/value shape of one kind of attention site: ``n_layers`` sites of ``n_kv_heads × head_dim``."""

    n_layers: int
    n_kv_heads: int
    head_dim: int  # of the keys
    value_dim: int = 0  # of the values, where it differs from the keys' (DeepSeek's latent attention)

    @property
    def value_width(self) -> int:
        return self.value_dim or self.head_dim

    def to_dict(self) -> dict:
        out = {"n_layers": self.n_layers, "n_kv_heads": self.n_kv_heads, "head_dim": self.head_dim}
        if self.value_dim and self.value_dim != self.head_dim:
            out["value_dim"] = self.value_dim
        return out


@dataclass(frozen=True)
class ModelGeometry:
    """What an adapter depends on; stored in adapter files and checked when loading."""

    model_type: str
    hidden_size: int
    vocab_size: int
    is_encoder_decoder: bool
    attention: dict

    def to_dict(self) -> dict:
        return asdict(self)


def _first(config: PretrainedConfig, *names: str):
    for name in names:
        value = getattr(config, name, None)
        if value is not None:
            return value
    return None


def hidden_size(config: PretrainedConfig) -> int:
    """The model width, whatever the config calls it (hidden_size, d_model, n_embd)."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    value = _first(text, "hidden_size", "d_model", "n_embd")
    if not value:
        raise IncompatibleModelError(
            f"cannot read the hidden size of model_type={getattr(config, 'model_type', '?')!r}."
        )
    return int(value)


def attention_geometry(config: PretrainedConfig, kind: str) -> AttentionGeometry:
    """Layers, key/value heads (GQA/MQA aware) and head size of one kind of attention site."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    hidden = hidden_size(config)
    if kind in (DECODER, CROSS):
        layers = _first(text, "decoder_layers", "num_decoder_layers", "num_layers", "num_hidden_layers")
        heads = _first(text, "decoder_attention_heads", "num_attention_heads", "num_heads")
    elif kind == ENCODER:
        layers = _first(text, "encoder_layers", "num_layers", "num_hidden_layers")
        heads = _first(text, "encoder_attention_heads", "num_attention_heads", "num_heads")
    else:
        layers = _first(text, "num_hidden_layers", "n_layer", "num_layers")
        heads = _first(text, "num_attention_heads", "n_head", "num_heads")
    kv_heads = _first(text, "num_key_value_heads", "multi_query_group_num") or heads
    if getattr(text, "multi_query", False):
        kv_heads = 1
    head_dim = _first(text, "head_dim", "d_kv") or (hidden // heads if hidden and heads else None)
    value_dim = 0
    if getattr(text, "v_head_dim", None) and getattr(text, "qk_nope_head_dim", None) is not None:
        # multi-head latent attention: per-head keys of nope + rope size, values of their own size
        head_dim = int(text.qk_nope_head_dim) + int(getattr(text, "qk_rope_head_dim", 0) or 0)
        value_dim = int(text.v_head_dim)
        kv_heads = heads
    if not (layers and kv_heads and head_dim):
        raise IncompatibleModelError(
            f"cannot read the attention shape of model_type={getattr(config, 'model_type', '?')!r} from its "
            "config (need layer count, key/value heads and head size); this architecture is not supported "
            "by prefix methods yet."
        )
    return AttentionGeometry(int(layers), int(kv_heads), int(head_dim), value_dim if value_dim != head_dim else 0)


def model_geometry(
    config: PretrainedConfig, attention_sites: dict[str, AttentionGeometry] | None = None
) -> ModelGeometry:
    """The model's geometry; ``attention_sites``: the key/value shape of each kind of attention
    site as the model computes it (``PrefixInjector.geometry``)."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    attention = {kind: g.to_dict() for kind, g in (attention_sites or {}).items()}
    return ModelGeometry(
        model_type=str(getattr(config, "model_type", "")),
        hidden_size=hidden_size(config),
        vocab_size=int(getattr(text, "vocab_size", 0) or 0),
        is_encoder_decoder=bool(getattr(config, "is_encoder_decoder", False)),
        attention=attention,
    )


__all__ = [
    "AttentionGeometry",
    "ModelGeometry",
    "attention_geometry",
    "hidden_size",
    "model_geometry",
    "SELF",
    "ENCODER",
    "DECODER",
    "CROSS",
]

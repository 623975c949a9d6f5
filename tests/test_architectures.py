"""The tiny random models of every architecture build, run a padded forward and keep their conventions."""

from __future__ import annotations

import functools

import pytest
import torch

from pstar_plugins.testing.architectures import (
    ARCHITECTURES,
    ATTN_FALLBACK,
    KIND,
    MISSING,
    VOCAB,
    tiny_config,
    tiny_model,
)

BATCH, LENGTH = 3, 12
# Families whose released configs use a sliding window; their tiny window must bite on LENGTH tokens.
SLIDING = ("mistral", "mixtral", "phi3", "starcoder2", "gemma2", "gemma3_text", "modernbert")


@functools.lru_cache(maxsize=None)
def _model(arch: str):
    return tiny_model(arch)


def _batch(arch: str) -> dict[str, torch.Tensor]:
    """A (3, 12) batch padded on the left (causal) or the right (others), with its attention mask."""
    _, config = tiny_config(arch)
    generator = torch.Generator().manual_seed(0)
    input_ids = torch.randint(3, VOCAB - 1, (BATCH, LENGTH), generator=generator)
    attention_mask = torch.ones_like(input_ids)
    for row, n_pad in enumerate((0, 3, 7)):
        if n_pad:
            pad = slice(0, n_pad) if KIND[arch] == "causal-lm" else slice(LENGTH - n_pad, LENGTH)
            input_ids[row, pad] = config.pad_token_id
            attention_mask[row, pad] = 0
    batch = dict(input_ids=input_ids, attention_mask=attention_mask)
    if KIND[arch] == "seq2seq-lm":
        decoder_input_ids = torch.randint(3, VOCAB - 1, (BATCH, 5), generator=generator)
        decoder_input_ids[:, 0] = config.decoder_start_token_id
        batch["decoder_input_ids"] = decoder_input_ids
    return batch


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_padded_forward_gives_finite_logits_over_the_tiny_vocabulary(arch):
    batch = _batch(arch)
    with torch.no_grad():
        logits = _model(arch)(**batch).logits
    length = batch["decoder_input_ids"].shape[1] if KIND[arch] == "seq2seq-lm" else LENGTH
    assert logits.shape == (BATCH, length, VOCAB)
    assert torch.isfinite(logits).all()


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_config_is_the_family_own_and_model_matches_kind(arch):
    auto, config = tiny_config(arch)
    assert config.model_type.replace("-", "_") == arch.replace("-", "_")
    assert (
        auto.__name__
        == {
            "causal-lm": "AutoModelForCausalLM",
            "masked-lm": "AutoModelForMaskedLM",
            "seq2seq-lm": "AutoModelForSeq2SeqLM",
        }[KIND[arch]]
    )
    model = _model(arch)
    assert model.config.model_type == config.model_type
    assert not model.training
    assert model.get_input_embeddings().num_embeddings == VOCAB


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_special_tokens_are_inside_the_vocabulary(arch):
    _, config = tiny_config(arch)
    assert config.pad_token_id is not None
    for name in ("pad_token_id", "bos_token_id", "eos_token_id", "decoder_start_token_id"):
        value = getattr(config, name, None)
        assert value is None or 0 <= value < VOCAB, (name, value)


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_sliding_windows_are_smaller_than_the_test_sequence(arch):
    _, config = tiny_config(arch)
    window = getattr(config, "sliding_window", None)
    if arch in SLIDING:
        assert window is not None and window < LENGTH
    if window is not None:
        assert window < LENGTH


@pytest.mark.parametrize("arch", ["gemma2", "gemma3_text", "modernbert"])
def test_alternating_families_have_both_layer_kinds(arch):
    _, config = tiny_config(arch)
    assert set(config.layer_types) == {"sliding_attention", "full_attention"}


def test_smollm3_has_rope_and_nope_layers():
    _, config = tiny_config("smollm3")
    assert set(config.no_rope_layers) == {0, 1}


def test_deepseek_v3_has_latent_attention_with_distinct_qk_and_v_head_sizes_and_a_moe_layer():
    _, config = tiny_config("deepseek_v3")
    assert config.qk_nope_head_dim + config.qk_rope_head_dim != config.v_head_dim
    assert config.q_lora_rank and config.kv_lora_rank
    assert config.first_k_dense_replace < config.num_hidden_layers
    assert (config.n_routed_experts, config.num_experts_per_tok) == (4, 2)


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_no_dropout_so_train_mode_is_deterministic(arch):
    _, config = tiny_config(arch)
    for name, value in config.to_dict().items():
        if any(word in name for word in ("dropout", "pdrop", "layerdrop")) and isinstance(value, (int, float)):
            assert value == 0, (name, value)
    model = _model(arch)
    batch = _batch(arch)
    model.train()
    try:
        with torch.no_grad():
            first, second = model(**batch).logits, model(**batch).logits
    finally:
        model.eval()
    assert torch.equal(first, second)


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_attention_implementation_is_sdpa_unless_the_family_lacks_it(arch):
    model = _model(arch)
    if arch in ATTN_FALLBACK:
        assert not type(model)._supports_sdpa
        assert model.config._attn_implementation == "eager"
    else:
        assert model.config._attn_implementation == "sdpa"


def test_seed_decides_the_weights():
    first, again, other = (tiny_model("llama", seed=s).lm_head.weight for s in (0, 0, 1))
    assert torch.equal(first, again)
    assert not torch.equal(first, other)


def test_tables_agree():
    assert set(KIND) == set(ARCHITECTURES)
    assert set(KIND.values()) <= {"causal-lm", "masked-lm", "seq2seq-lm"}
    assert not set(MISSING) & set(ARCHITECTURES)
    assert set(ATTN_FALLBACK) <= set(ARCHITECTURES)


def test_unknown_architecture_is_refused_with_the_known_ones_named():
    with pytest.raises(ValueError, match=r"unknown tiny architecture 'lama'.*llama"):
        tiny_config("lama")

"""What attention receives, recorded at ``F.scaled_dot_product_attention`` on a tiny GQA Llama.

Unpadded batches: prompt tuning and P-tuning run with no mask and ``is_causal``; prefix methods
get one causal pattern per forward (on CUDA ``causal_lower_right``, elsewhere one boolean mask)
shared by every layer, with the K/V heads left grouped. Padded batches: the prefix columns are
added once per forward, not once per layer. Values and gradients are the conformance suite's
business (tests/test_matrix.py); this file pins down the calls.
"""

from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F

from tests.helpers import inputs_for, make

METHODS = ["prompt-tuning", "p-tuning", "prefix-tuning", "p-tuning-v2"]
PREFIX = {"prefix-tuning", "p-tuning-v2"}


@dataclass
class Call:
    mask: object
    is_causal: bool
    enable_gqa: bool
    query_heads: int
    key_heads: int
    key_len: int
    query_len: int


@pytest.fixture
def calls(monkeypatch):
    seen: list[Call] = []
    real = F.scaled_dot_product_attention

    def spy(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
        seen.append(Call(attn_mask, is_causal, enable_gqa, query.shape[1], key.shape[1], key.shape[2], query.shape[2]))
        return real(
            query,
            key,
            value,
            attn_mask=attn_mask,
            dropout_p=dropout_p,
            is_causal=is_causal,
            scale=scale,
            enable_gqa=enable_gqa,
        )

    monkeypatch.setattr(F, "scaled_dot_product_attention", spy)
    return seen


def _forward(calls: list, method: str, packing: bool, padded: bool, training: bool):
    model = make("llama", method)
    calls.clear()  # the build's attention probe
    model.packing = packing
    model.train(training)
    inputs = inputs_for("llama", method, n=3, length=10)
    if padded:
        inputs["attention_mask"][0, :4] = 0  # left padding on one row
        if "labels" in inputs and inputs["labels"].dim() == 2:
            inputs["labels"][0, :4] = -100
    return model, inputs


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("packing", [True, False], ids=["packed", "padded-call"])
@pytest.mark.parametrize("method", METHODS)
def test_unpadded_batches_get_no_mask_tensor_per_layer(calls, method, packing, training):
    model, inputs = _forward(calls, method, packing, padded=False, training=training)
    with torch.set_grad_enabled(training):
        model(**inputs)
    layers = model.base_model.config.num_hidden_layers
    extra = model.method_config.num_virtual_tokens if method == "prompt-tuning" else 0  # [P; E]
    assert len(calls) == layers and all(c.query_len == 10 + extra for c in calls)
    assert all(c.query_heads > c.key_heads and c.enable_gqa for c in calls), calls  # K/V not repeated to every head
    if method not in PREFIX:
        assert all(c.mask is None and c.is_causal for c in calls), calls
        return
    m = model.method_config.num_virtual_tokens
    masks = {id(c.mask) for c in calls}
    assert len(masks) == 1, "one causal pattern per forward, shared by every layer"
    mask = calls[0].mask
    assert tuple(mask.shape) == (1, 1, 10, m + 10) and mask.dtype == torch.bool  # no batch dimension either
    expected = torch.ones(10, m + 10, dtype=torch.bool).tril(m)  # bottom-right aligned: every query sees the prefix
    assert torch.equal(mask[0, 0], expected)
    assert all(c.key_len == m + 10 and not c.is_causal for c in calls)


@pytest.mark.parametrize("packing", [True, False], ids=["packed", "padded-call"])
@pytest.mark.parametrize("method", sorted(PREFIX))
def test_padded_prefix_batches_extend_the_mask_once_per_forward(calls, method, packing):
    model, inputs = _forward(calls, method, packing, padded=True, training=True)
    model(**inputs)
    assert len(calls) == model.base_model.config.num_hidden_layers
    assert len({id(c.mask) for c in calls}) == 1, "the prefix columns are prepended once, not in every layer"
    assert all(c.mask is not None for c in calls)


def test_lower_right_pattern_equals_torchs_causal_lower_right():
    from torch.nn.attention.bias import causal_lower_right

    from pstar_plugins.mechanisms.attention_kernels import lower_right_causal

    for q, kv, m in [(10, 10, 3), (1, 7, 2), (4, 9, 5)]:
        ours = lower_right_causal(q, kv, m, torch.device("cpu"))[0, 0]
        assert torch.equal(ours, causal_lower_right(q, m + kv)._materialize())


def test_the_shared_mask_is_rebuilt_for_every_call(calls):
    model, inputs = _forward(calls, "prefix-tuning", packing=False, padded=False, training=False)
    with torch.no_grad():
        model(**inputs)
        model(**inputs)
    layers = model.base_model.config.num_hidden_layers
    first, second = {id(c.mask) for c in calls[:layers]}, {id(c.mask) for c in calls[layers:]}
    assert len(first) == len(second) == 1 and model.method.injector._masks == {}


def test_layers_of_different_types_keep_one_mask_each(calls):
    """Alternating full and sliding-window layers get two masks per forward, not one per layer."""
    from pstar_plugins import build_model
    from pstar_plugins.testing.architectures import tiny_config
    from tests.helpers import METHOD_OPTIONS

    auto, config = tiny_config("qwen2")
    config.num_hidden_layers, config.use_sliding_window, config.sliding_window = 4, True, 3
    config.layer_types = ["full_attention", "sliding_attention"] * 2
    torch.manual_seed(0)
    model = build_model(
        auto.from_config(config, attn_implementation="sdpa").eval(), "prefix-tuning", **METHOD_OPTIONS["prefix-tuning"]
    )
    model.packing = False
    inputs = inputs_for("qwen2", "prefix-tuning", n=3, length=10)
    inputs["attention_mask"][0, :4] = 0
    calls.clear()
    with torch.no_grad():
        model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"])
    assert len(calls) == 4
    masks = [id(c.mask) for c in calls]
    assert masks[0] == masks[2] and masks[1] == masks[3] and masks[0] != masks[1], masks

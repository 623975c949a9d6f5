"""Prefix methods and packed calls on flex_attention, checked on the CPU against sdpa.

Prefixes reach flex as a block mask whose ``mask_mod`` is the model's own (causal, padding,
window) shifted past the prefix columns; packed calls get the packing plan's pattern as a block
mask (one per layer type). These tests run flex uncompiled (torch's reference implementation of
the same ``mask_mod`` and block mask), which checks everything this library hands the kernel. The
compiled CPU kernel of torch 2.13 is not usable as a reference: once torch.compile has compiled
flex for one mask, recompiling it for another (a new batch shape, another block pattern) gives
NaN, wrong values or a CppCompileError, which is why ``pstar train`` / ``pstar eval`` refuse
flex_attention on the CPU; bench/gpu_check.sh runs the compiled kernel on CUDA.
"""

import pytest
import torch

from pstar_plugins import build_model
from pstar_plugins.mechanisms import fast_paths, packing
from pstar_plugins.testing.architectures import tiny_model
from tests.helpers import METHOD_OPTIONS, random_batch, soft_index

# uncompiled flex_attention warns that it is unfused (the point here); torch.compile's internals
# (create_block_mask(_compile=...), jit) warn about themselves
pytestmark = [
    pytest.mark.filterwarnings("ignore::UserWarning"),
    pytest.mark.filterwarnings("ignore::DeprecationWarning"),
]
METHODS = ["prompt-tuning", "p-tuning", "prefix-tuning", "p-tuning-v2"]


@pytest.fixture(autouse=True)
def uncompiled_flex(monkeypatch):
    """transformers' flex integration calls torch.compile(flex_attention); here the same call, uncompiled."""
    from torch.nn.attention.flex_attention import flex_attention
    from transformers.integrations import flex_attention as hf_flex

    def reference(query, key, value, training=False, **kwargs):
        return flex_attention(query, key, value, **kwargs)

    monkeypatch.setattr(hf_flex, "compile_friendly_flex_attention", reference)


def _model(arch: str, method: str, impl: str, **options):
    base = tiny_model(arch, attn_implementation=impl)
    with torch.no_grad():  # weights large enough that attention is far from uniform
        for p in base.parameters():
            p.mul_(3)
    torch.manual_seed(0)
    model = build_model(base, method, **{**METHOD_OPTIONS[method], **options}).eval()
    with torch.no_grad():  # prompts that differ from their initialisation (and between tasks)
        for p in model.method.parameters():
            p.add_(torch.randn_like(p) * 0.5)
    return model


def _batch(padded: bool):
    ids = random_batch(3, 10, seed=0)
    mask = torch.ones_like(ids)
    if padded:  # on the right: P-tuning's soft slots open every row
        mask[0, 6:], mask[2, 8:] = 0, 0
    return ids, mask


def _scores(model, method: str, ids, mask, **extra):
    """The outputs at real positions (P-tuning v2: its classifier's logits)."""
    if method == "p-tuning":
        extra["prompt_index"] = soft_index(*ids.shape)
    with torch.no_grad():
        if method == "p-tuning-v2":
            return model(input_ids=ids, attention_mask=mask, **extra).logits
        logits = model(input_ids=ids, attention_mask=mask, logits_to_keep=ids.shape[1], **extra).logits
    return logits[mask.bool()]


@pytest.mark.parametrize("arch", ["llama", "qwen2"])  # GQA + RoPE; RoPE with one mask per layer type
@pytest.mark.parametrize("method", METHODS)
def test_every_method_evaluates_on_flex_like_sdpa(arch, method):
    models = {impl: _model(arch, method, impl) for impl in ("sdpa", "flex_attention")}
    for packed in (True, False):
        for padded in (True, False):
            ids, mask = _batch(padded)
            out, paths = {}, {}
            for impl, model in models.items():
                model.packing = packed
                with packing.recording() as seen:
                    out[impl] = _scores(model, method, ids, mask)
                paths[impl] = [p for p in seen if p.startswith("call")]  # (prompt tuning: its cache too)
            assert paths["flex_attention"] == paths["sdpa"], "flex takes the same path as sdpa"
            if packed:
                assert paths["flex_attention"] == ["call: packed"], paths
            torch.testing.assert_close(
                out["flex_attention"],
                out["sdpa"],
                rtol=1e-5,
                atol=1e-5,
                msg=lambda m: f"packing={packed} padded={padded}: {m}",
            )


@pytest.mark.parametrize("method", ["prefix-tuning", "prompt-tuning"])
def test_mixed_task_packed_calls_on_flex_see_only_their_own_prompt(method):
    """Packed rows hold examples of three tasks; under flex each query sees its own task's prefix
    columns only (a leak would change the values)."""
    models = {impl: _model("llama", method, impl, num_tasks=3) for impl in ("sdpa", "flex_attention")}
    ids, mask = _batch(padded=True)
    task_ids = torch.tensor([2, 0, 1])
    out = {}
    for impl, model in models.items():
        model.packing = True
        with packing.recording() as seen:
            out[impl] = _scores(model, method, ids, mask, task_ids=task_ids)
        assert [p for p in seen if p.startswith("call")] == ["call: packed"], seen
    torch.testing.assert_close(out["flex_attention"], out["sdpa"], rtol=1e-5, atol=1e-5)
    alone = _scores(models["flex_attention"], method, ids[1:2], mask[1:2], task_ids=task_ids[1:2])
    torch.testing.assert_close(
        out["flex_attention"][int(mask[0].sum()) : int(mask[:2].sum())], alone, rtol=1e-5, atol=1e-5
    )


def test_packed_prefill_on_flex_equals_sdpa():
    """The prompt's cache computed padding-free on flex (the prefill generate() would use on a GPU)
    equals sdpa's at every real position."""
    ids, mask = _batch(padded=True)
    caches = {}
    for impl in ("sdpa", "flex_attention"):
        base = tiny_model("llama", attn_implementation=impl)
        assert packing.prefill_unsupported_reason(base, {"input_ids": ids, "attention_mask": mask}, {}) is None
        caches[impl] = packing.prefill(base, {"input_ids": ids, "attention_mask": mask})
    real = mask[:, :-1].bool()
    for mine, theirs in zip(caches["flex_attention"].layers, caches["sdpa"].layers, strict=True):
        torch.testing.assert_close(mine.keys.transpose(1, 2)[real], theirs.keys.transpose(1, 2)[real])
        torch.testing.assert_close(
            mine.values.transpose(1, 2)[real], theirs.values.transpose(1, 2)[real], rtol=1e-5, atol=1e-5
        )


def test_flex_calls_get_one_block_mask_per_forward(monkeypatch):
    """What flex receives: a block mask over the prefix and the packed row, the same object in
    every layer (built once per forward), never a dense tensor."""
    from torch.nn.attention.flex_attention import BlockMask
    from transformers.integrations import flex_attention as hf_flex
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    seen = []
    real = hf_flex.flex_attention_forward

    def spy(module, query, key, value, attention_mask, **kwargs):
        seen.append((attention_mask, key.shape[2]))
        return real(module, query, key, value, attention_mask, **kwargs)

    monkeypatch.setitem(ALL_ATTENTION_FUNCTIONS, "flex_attention", spy)
    model = _model("llama", "prefix-tuning", "flex_attention")
    m = model.method_config.num_virtual_tokens
    ids, mask = _batch(padded=True)
    for packed in (True, False):
        model.packing = packed
        seen.clear()
        _scores(model, "prefix-tuning", ids, mask)
        assert len(seen) == model.base_model.config.num_hidden_layers
        assert all(isinstance(block, BlockMask) for block, _ in seen), [type(b) for b, _ in seen]
        assert len({id(block) for block, _ in seen}) == 1
        width = seen[0][1] - m
        rows = 1 if packed else 3  # the three examples pack into one row
        assert seen[0][0].shape == (rows, 1, width, m + width), seen[0][0].shape


def test_flex_packing_is_allow_listed_by_family():
    base = tiny_model("mistral", attn_implementation="flex_attention")
    assert "flex_attention packing is verified for ['llama', 'qwen2'] only" in fast_paths.kernel_reason(base)
    assert fast_paths.kernel_reason(tiny_model("llama", attn_implementation="flex_attention")) is None


def _sliding_qwen2(impl: str):
    from pstar_plugins.testing.architectures import tiny_config

    auto, config = tiny_config("qwen2")
    config.use_sliding_window, config.sliding_window, config.max_window_layers = True, 3, 1
    config.layer_types = ["full_attention", "sliding_attention"]
    torch.manual_seed(0)
    base = auto.from_config(config, attn_implementation=impl).eval()
    with torch.no_grad():
        for p in base.parameters():
            p.mul_(3)
    return base


@pytest.mark.parametrize("method", ["prefix-tuning", "prompt-tuning"])
def test_packed_calls_with_sliding_window_layers_on_flex_equal_sdpa(method):
    """One block mask per layer type, the sliding one honouring the window (3 tokens here)."""
    ids, mask = _batch(padded=True)
    out = {}
    for impl in ("sdpa", "flex_attention"):
        torch.manual_seed(0)
        model = build_model(_sliding_qwen2(impl), method, **METHOD_OPTIONS[method]).eval()
        model.packing = impl == "flex_attention"
        with packing.recording() as seen:
            out[impl] = _scores(model, method, ids, mask)
        assert seen == ["call: packed" if model.packing else "call: padded (packing is off)"], seen
    torch.testing.assert_close(out["flex_attention"], out["sdpa"], rtol=1e-5, atol=1e-5)


def test_prefix_on_flex_with_relative_position_bias_equals_eager():
    """T5 adds a relative position bias to the scores; the prefix columns get none, on flex as elsewhere.
    One row: transformers 5.25's flex score_mod indexes T5's (1, heads, q, k) bias by the batch
    index, so the bare T5 already fails on flex with two rows."""
    ids = random_batch(1, 7, seed=0)
    mask = torch.ones_like(ids)
    labels = random_batch(1, 4, seed=1)
    out = {}
    for impl in ("eager", "flex_attention"):
        torch.manual_seed(0)
        base = tiny_model("t5", attn_implementation=impl)
        torch.manual_seed(0)
        model = build_model(base, "prefix-tuning", **METHOD_OPTIONS["prefix-tuning"]).eval()
        with torch.no_grad():
            out[impl] = model(input_ids=ids, attention_mask=mask, labels=labels).logits
    torch.testing.assert_close(out["flex_attention"], out["eager"], rtol=1e-5, atol=1e-5)

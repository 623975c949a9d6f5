"""Prefix methods on flash_attention_2, checked on the CPU against an emulation of the kernel.

flash-attn runs only on NVIDIA GPUs. What the library adds on that path is small: the 2D padding
mask transformers builds for flash gains ``m`` visible columns, an unpadded batch keeps ``None``
(flash aligns its causal pattern to the bottom-right corner, so queries see the whole prefix),
and the module's own config is shown to the kernel. ``flash_reference`` below computes exactly
what ``transformers.integrations.flash_attention.flash_attention_forward`` computes (per row: the
real queries and keys picked by the mask, causal aligned bottom-right), so these tests check the
library's half against sdpa; bench/gpu_check.sh runs the real kernel. Until that has passed on a
GPU, prefix methods on flash_attention_2 are refused unless ``PSTAR_UNVERIFIED_KERNELS`` names it.
"""

import pytest
import torch
import torch.nn.functional as F
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from pstar_plugins import build_model
from pstar_plugins.contract.errors import IncompatibleModelError
from pstar_plugins.mechanisms import fast_paths, packing
from pstar_plugins.mechanisms.attention_kernels import UNVERIFIED_KERNELS_ENV
from pstar_plugins.testing.architectures import tiny_model
from tests.helpers import METHOD_OPTIONS, random_batch, soft_index

PREFIX_METHODS = ["prefix-tuning", "p-tuning-v2"]
METHODS = ["prompt-tuning", "p-tuning", *PREFIX_METHODS]
SEEN: list[dict] = []


def flash_reference(
    module,
    query,
    key,
    value,
    attention_mask,
    dropout=0.0,
    scaling=None,
    sliding_window=None,
    softcap=None,
    is_causal=None,
    **kwargs,
):
    """flash_attention_forward's result, computed row by row with sdpa. ``attention_mask``:
    ``(B, K)`` with 1 at real keys, the last ``Q`` columns being the queries', or ``None``."""
    assert module.config._attn_implementation == "flash_attention_2", "the kernel reads its name from the config"
    assert softcap is None
    assert sliding_window is None or key.shape[2] <= sliding_window, "transformers slides only when keys outnumber it"
    SEEN.append({"mask": attention_mask, "key_len": key.shape[2], "query_len": query.shape[2]})
    is_causal = module.is_causal if is_causal is None else is_causal
    B, _, Q, _ = query.shape
    K = key.shape[2]
    repeat = query.shape[1] // key.shape[1]
    key, value = key.repeat_interleave(repeat, dim=1), value.repeat_interleave(repeat, dim=1)
    out = torch.zeros_like(query)
    positions = kwargs.get("position_ids")
    if (
        kwargs.get("cu_seq_lens_q") is None
        and attention_mask is None
        and B == 1
        and positions is not None
        and Q > 1
        and bool((positions.reshape(-1) != torch.arange(Q) + positions.min()).any())
    ):
        # transformers' _is_packed_sequence: one row of examples told apart by their position ids,
        # cut at the same places for queries and keys (prepare_fa_kwargs_from_position_ids)
        starts = (positions.reshape(-1) == positions.min()).nonzero().view(-1)
        cu = torch.cat([starts, starts.new_tensor([Q])]).to(torch.int32)
        kwargs = {
            **kwargs,
            "cu_seq_lens_q": cu,
            "cu_seq_lens_k": cu,
            "max_length_q": int(cu.diff().max()),
            "max_length_k": int(cu.diff().max()),
        }
    if kwargs.get("cu_seq_lens_q") is not None:  # one packed row: each example by itself
        assert attention_mask is None and B == 1
        for name in ("cu_seq_lens_q", "cu_seq_lens_k"):  # what flash-attn's varlen kernel accepts
            assert kwargs[name].dtype == torch.int32, (name, kwargs[name].dtype)
        for name in ("max_length_q", "max_length_k"):
            assert type(kwargs[name]) is int, (name, type(kwargs[name]))
        cu_q, cu_k = kwargs["cu_seq_lens_q"].tolist(), kwargs["cu_seq_lens_k"].tolist()
        assert cu_q[-1] == Q and cu_k[-1] == K and kwargs["max_length_k"] == max(b - a for a, b in zip(cu_k, cu_k[1:]))
        for (q0, q1), (k0, k1) in zip(zip(cu_q, cu_q[1:]), zip(cu_k, cu_k[1:])):
            allowed = torch.ones(q1 - q0, k1 - k0, dtype=torch.bool).tril((k1 - k0) - (q1 - q0))
            out[0][:, q0:q1] = F.scaled_dot_product_attention(
                query[0][:, q0:q1], key[0][:, k0:k1], value[0][:, k0:k1], attn_mask=allowed, scale=scaling
            )
        return out.transpose(1, 2).contiguous(), None
    for b in range(B):
        keys = attention_mask[b].bool() if attention_mask is not None else torch.ones(K, dtype=torch.bool)
        queries = keys[-Q:]
        nq, nk = int(queries.sum()), int(keys.sum())
        allowed = torch.ones(nq, nk, dtype=torch.bool)
        if is_causal:
            allowed = allowed.tril(nk - nq)  # bottom-right aligned, as flash-attn >= 2.1
        q, k, v = query[b][:, queries], key[b][:, keys], value[b][:, keys]
        rows = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, scale=scaling)
        out[b][:, queries] = rows
    return out.transpose(1, 2).contiguous(), None


@pytest.fixture
def flash(monkeypatch):
    monkeypatch.setitem(ALL_ATTENTION_FUNCTIONS, "flash_attention_2", flash_reference)
    monkeypatch.setenv(UNVERIFIED_KERNELS_ENV, "flash_attention_2")
    SEEN.clear()
    return SEEN


def _pair(method: str, seed: int = 0, **options):
    """The same model twice: on sdpa, and on (emulated) flash_attention_2."""
    models = {}
    for impl in ("sdpa", "flash_attention_2"):
        base = tiny_model("llama", seed=seed)
        with torch.no_grad():  # weights large enough that attention is far from uniform
            for p in base.parameters():
                p.mul_(3)
        if impl == "flash_attention_2":
            base.config._attn_implementation = impl
        torch.manual_seed(seed)
        models[impl] = build_model(base, method, **{**METHOD_OPTIONS[method], **options})
        models[impl].packing = False
    SEEN.clear()  # the build's probe calls
    return models


@pytest.mark.parametrize("padding", ["left", "right", "none"])
@pytest.mark.parametrize("method", PREFIX_METHODS)
def test_prefix_on_flash_equals_sdpa_values_and_gradients(flash, method, padding):
    models = _pair(method)
    ids = random_batch(3, 10, seed=1)
    mask = torch.ones_like(ids)
    if padding == "left":
        mask[0, :4], mask[2, :2] = 0, 0
    elif padding == "right":
        mask[0, 6:], mask[2, 8:] = 0, 0
    out, grads = {}, {}
    for impl, model in models.items():
        model.train()
        result = model(input_ids=ids, attention_mask=mask).logits
        real = result if result.dim() == 2 else result[mask.bool()]
        (real * torch.randn(real.shape, generator=torch.Generator().manual_seed(2))).sum().backward()
        out[impl] = real.detach()
        grads[impl] = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    torch.testing.assert_close(out["flash_attention_2"], out["sdpa"], rtol=1e-5, atol=1e-5)
    assert grads["sdpa"].keys() == grads["flash_attention_2"].keys() and grads["sdpa"]
    for name in grads["sdpa"]:
        torch.testing.assert_close(grads["flash_attention_2"][name], grads["sdpa"][name], rtol=1e-4, atol=1e-6)
    m = models["sdpa"].method_config.num_virtual_tokens
    assert flash and all(call["key_len"] == m + 10 for call in flash)
    if padding == "none":
        assert all(call["mask"] is None for call in flash), "no mask where none is needed"
    else:
        assert all(call["mask"].shape == (3, m + 10) and bool(call["mask"][:, :m].all()) for call in flash)


def test_prefix_on_flash_decodes_like_sdpa(flash):
    models = _pair("prefix-tuning")
    ids = random_batch(2, 6, seed=3)
    mask = torch.ones_like(ids)
    mask[0, :2] = 0
    out = {
        impl: model.eval().generate(
            input_ids=ids, attention_mask=mask, max_new_tokens=4, do_sample=False, pad_token_id=0
        )
        for impl, model in models.items()
    }
    assert torch.equal(out["flash_attention_2"], out["sdpa"])
    assert any(call["query_len"] == 1 for call in flash)  # the cached decoding steps went through it too


def test_prefix_on_unverified_flash_is_refused_with_the_fix(monkeypatch):
    monkeypatch.delenv(UNVERIFIED_KERNELS_ENV, raising=False)
    base = tiny_model("llama")
    base.config._attn_implementation = "flash_attention_2"
    with pytest.raises(
        IncompatibleModelError, match="not yet verified on a GPU.*attn_implementation='sdpa'.*gpu_check"
    ):
        build_model(base, "prefix-tuning", **METHOD_OPTIONS["prefix-tuning"])


@pytest.mark.skipif(
    not torch.cuda.is_available() or __import__("importlib").util.find_spec("flash_attn") is None,
    reason="needs flash-attn on a CUDA device (bench/gpu_check.sh)",
)
@pytest.mark.parametrize("method", PREFIX_METHODS)
def test_prefix_on_real_flash_equals_sdpa_on_cuda(monkeypatch, method):
    monkeypatch.setenv(UNVERIFIED_KERNELS_ENV, "flash_attention_2")
    ids = random_batch(3, 10, seed=1).cuda()
    mask = torch.ones_like(ids)
    mask[0, :4] = 0
    out = {}
    for impl in ("sdpa", "flash_attention_2"):
        torch.manual_seed(0)
        model = build_model(
            tiny_model("llama", attn_implementation=impl, dtype=torch.bfloat16).cuda(), method, **METHOD_OPTIONS[method]
        ).eval()
        with torch.no_grad():
            logits = model(input_ids=ids, attention_mask=mask).logits
        out[impl] = (logits if logits.dim() == 2 else logits[mask.bool()]).float()
    torch.testing.assert_close(out["flash_attention_2"], out["sdpa"], rtol=2e-2, atol=2e-2)


def _loss_and_grads(model, method: str, ids, mask, **extra):
    model.train()
    if method == "p-tuning":
        extra["prompt_index"] = soft_index(*ids.shape)
    if method == "p-tuning-v2":
        out = model(input_ids=ids, attention_mask=mask, **extra).logits
    else:
        out = model(input_ids=ids, attention_mask=mask, logits_to_keep=ids.shape[1], **extra).logits[mask.bool()]
    (out * torch.randn(out.shape, generator=torch.Generator().manual_seed(2))).sum().backward()
    return out.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("method", METHODS)
def test_packed_calls_on_flash_are_one_row_with_cu_seqlens_and_equal_sdpa(flash, method):
    """Packing on flash: every example in one row, attention kept within each example by
    transformers' variable-length kwargs (prefixes joined in front of each example's keys);
    values and gradients equal sdpa's padded call."""
    models = _pair(method)
    ids = random_batch(3, 10, seed=1)
    mask = torch.ones_like(ids)
    mask[0, 6:], mask[2, 8:] = 0, 0  # on the right: P-tuning's soft slots open every row
    models["sdpa"].packing = False
    models["flash_attention_2"].packing = True
    results = {}
    for impl, model in models.items():
        with packing.recording() as paths:
            results[impl] = _loss_and_grads(model, method, ids, mask)
        assert paths == (["call: packed"] if impl == "flash_attention_2" else ["call: padded (packing is off)"]), paths
    (out, grads), (ref, ref_grads) = results["flash_attention_2"], results["sdpa"]
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    assert grads.keys() == ref_grads.keys() and grads
    for name in grads:
        torch.testing.assert_close(grads[name], ref_grads[name], rtol=1e-4, atol=1e-6)
    extra = models["sdpa"].method_config.num_virtual_tokens if method == "prompt-tuning" else 0
    tokens = int(mask.sum()) + 3 * extra
    assert flash and all(call["query_len"] == tokens and call["mask"] is None for call in flash), "one row, no mask"


def test_mixed_task_prefixes_on_flash_run_padded_and_say_why(flash):
    models = _pair("prefix-tuning", num_tasks=2)
    model = models["flash_attention_2"]
    model.packing = True
    ids = random_batch(2, 6, seed=3)
    with packing.recording() as paths, torch.no_grad():
        model(input_ids=ids, attention_mask=torch.ones_like(ids), task_ids=torch.tensor([0, 1]), logits_to_keep=1)
    assert paths == ["call: padded (per-example prefixes cannot join flash_attention_2's variable-length rows)"]


def test_flash_packing_is_refused_until_verified(monkeypatch):
    monkeypatch.delenv(UNVERIFIED_KERNELS_ENV, raising=False)
    base = tiny_model("llama")
    base.config._attn_implementation = "flash_attention_2"
    assert "flash_attention_2 packing (one row, transformers' variable-length path) is not yet verified on a GPU" in (
        fast_paths.kernel_reason(base)
    )


def test_a_row_packed_by_position_ids_alone_keeps_each_example_to_its_prefix(flash):
    """DataCollatorWithFlattening's default: one row, no mask, position ids restarting at each
    example. transformers would cut keys where it cuts queries, but with a prefix the keys are m
    longer; the library cuts them itself, so each example equals its call alone."""
    model = _pair("prefix-tuning")["flash_attention_2"].eval()
    a, b = random_batch(1, 5, seed=1), random_batch(1, 4, seed=2)
    with torch.no_grad():
        packed = model(
            input_ids=torch.cat([a, b], 1),
            position_ids=torch.tensor([[0, 1, 2, 3, 4, 0, 1, 2, 3]]),
            logits_to_keep=9,
            use_cache=False,
        ).logits
        alone = torch.cat([model(input_ids=a, logits_to_keep=5).logits, model(input_ids=b, logits_to_keep=4).logits], 1)
    torch.testing.assert_close(packed, alone, rtol=1e-5, atol=1e-5)


def test_prefix_on_flash_refuses_a_window_that_applies_and_keeps_one_that_does_not(flash):
    from pstar_plugins.testing.architectures import tiny_config

    auto, config = tiny_config("mistral")
    config._attn_implementation = "sdpa"
    window = config.sliding_window
    base = auto.from_config(config)
    base.config._attn_implementation = "flash_attention_2"
    torch.manual_seed(0)
    model = build_model(base, "prefix-tuning", **METHOD_OPTIONS["prefix-tuning"]).eval()
    m = model.method_config.num_virtual_tokens
    with torch.no_grad():
        model(input_ids=random_batch(1, window - m, seed=0))  # m + length keys fit the window: nothing slides
        with pytest.raises(IncompatibleModelError, match="slides a window of .* on flash_attention_2"):
            model(input_ids=random_batch(1, window - m + 1, seed=0))


def test_prefix_on_flash_is_refused_for_encoder_decoders(flash):
    base = tiny_model("bart")
    base.config._attn_implementation = "flash_attention_2"
    with pytest.raises(IncompatibleModelError, match="for decoder-only models"):
        build_model(base, "prefix-tuning", **METHOD_OPTIONS["prefix-tuning"])

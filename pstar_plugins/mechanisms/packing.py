"""Padding-free calls of a decoder-only model on a padded batch.

A padded batch of ``B`` rows of length ``L`` costs ``B·L`` token positions in every layer, real
or not; SST-2 training batches are about half padding, and prompt tuning adds ``m`` real
positions to every row. Here the real positions of all rows are packed, first-fit decreasing,
into bins (:func:`pstar_plugins.mechanisms.pack_plan.plan`); every bin is one row of the call, and a 4D mask keeps
each example to itself (causal within its own tokens, never across examples). Each token keeps
the position id it had in the padded batch, so rotary and learned positions are unchanged, and
the outputs at real positions equal the padded call's up to float rounding (tests check it,
values and gradients, for every method on Llama and GPT-2 geometries).

A plan is never dearer than the padded call by that cost model (its first candidate has at most
``B`` bins no longer than the longest row). Attention stays within a bin, so its cost does not
grow with ``B`` (one long row with a block-diagonal mask would make it quadratic in the batch's
tokens).

The same idea as padding-free training with flash-attention's variable-length kernel
(transformers#31629) and TRL's first-fit-decreasing packing (trl#3526), done inside the model
call with an explicit mask: no collator change, the ``sdpa`` and ``eager`` kernels on any
device (``flex_attention`` gets the same pattern as a block mask; ``flash_attention_2`` one row
with transformers' ``cu_seq_lens`` kwargs, see
:func:`pstar_plugins.mechanisms.pack_plan.varlen_kwargs`), and per-layer prefixes (the prefix
columns that ``mechanisms.attention`` prepends are visible from every bin).

Applicability is checked, not assumed (:func:`unsupported_reason`, reading the model's record of
:mod:`pstar_plugins.mechanisms.fast_paths`); a call that cannot be
packed runs padded. A call that asks for its KV cache (``use_cache=True``, none passed in) is
packed too and returns the cache in the padded layout, so that a caller can continue every row
from it (one-pass label-word scoring does); a call that passes a cache in runs padded.
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable, ContextManager

import torch
from torch import nn
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast

from pstar_plugins.mechanisms import fast_paths
from pstar_plugins.mechanisms.fast_paths import PADDING_FREE_FAMILIES, has_sliding_layers
from pstar_plugins.mechanisms.inputs import accepts, positions_from_mask
from pstar_plugins.mechanisms.pack_plan import (
    PackPlan,
    attention_kernel,
    masks,
    pack,
    pair_cost,
    plan,
    unpack,
    varlen_kwargs,
)
from pstar_plugins.mechanisms.recording import Recorder

_CACHE_ARGUMENTS = ("cache", "past_key_values")  # transformers renamed past_key_values to cache in 5.x


def uses_cache(inputs: dict[str, Any]) -> bool:
    """Whether a model call's ``inputs`` pass or ask for a KV cache."""
    return any(inputs.get(name) is not None for name in _CACHE_ARGUMENTS) or bool(inputs.get("use_cache"))


def unsupported_reason(model: nn.Module, inputs: dict[str, Any], causal_lm: bool, method=None) -> str | None:
    """Why this call cannot be packed, or ``None`` when it can: the model's record
    (:func:`pstar_plugins.mechanisms.fast_paths.of`), then what this call passes. ``causal_lm``:
    ``model`` is a causal LM (logits wanted); otherwise it is the backbone of a decoder-only model."""
    mask = inputs.get("attention_mask")
    if mask is None or mask.dim() != 2:
        return "no 2D attention mask (nothing to unpad)"
    decided = fast_paths.of(model, method).packing
    if decided is not None:
        return decided
    if inputs.get("position_ids") is None:
        return "the model takes no position_ids"
    if any(inputs.get(name) is not None for name in _CACHE_ARGUMENTS):
        return "a KV cache is passed in"
    if inputs.get("use_cache") and has_sliding_layers(model.config):
        return "a KV cache is asked for from sliding-window layers (their cache keeps only the window)"
    if inputs.get("output_hidden_states") or inputs.get("output_attentions"):
        return "per-layer outputs are asked for (they would come back in the packed layout)"
    if inputs.get("return_dict") is False:
        return "return_dict=False"
    if inputs.get("labels") is not None:
        return "labels are passed (the model would compute its loss over padded positions)"
    if causal_lm:
        if not model.can_generate():
            return "not a causal LM"
        keep = inputs.get("logits_to_keep")
        if not (isinstance(keep, int) and 0 < keep <= mask.shape[1]):
            return "logits are asked for every position (pass logits_to_keep)"
        if model.get_output_embeddings() is None or not accepts(model, "logits_to_keep"):
            return "no LM head to apply"
    return None


#: inputs a packed call replaces with their packed form (or drops): the rest pass through
_PACKED_INPUTS = (
    "input_ids",
    "inputs_embeds",
    "attention_mask",
    "position_ids",
    "logits_to_keep",
    "labels",
    "use_cache",
    *_CACHE_ARGUMENTS,
)


def _packed_call(p: PackPlan, model: nn.Module, inputs: dict[str, Any], embed: nn.Module, cache=None, **extra):
    """``model`` (a causal LM or its backbone) on the rows of ``inputs`` packed by ``p``: the
    embeddings, positions and mask packed, ``cache`` (or none) as the model's cache, ``extra``
    (e.g. ``logits_to_keep``) and the caller's other inputs passed on."""
    embeds = inputs.get("inputs_embeds")
    if embeds is None:
        embeds = embed(inputs["input_ids"])
    call = {k: v for k, v in inputs.items() if k not in _PACKED_INPUTS}
    if cache is not None:
        call[_cache_argument(model)] = cache
    return model(
        inputs_embeds=pack(p, embeds),
        position_ids=pack(p, inputs["position_ids"]),
        attention_mask=masks(p, model, embeds.dtype),
        use_cache=cache is not None,
        **varlen_kwargs(p, model),
        **extra,
        **call,
    )


def _packed_backbone_call(
    p: PackPlan, backbone: nn.Module, inputs: dict[str, Any], embed: nn.Module, cache=None
) -> torch.Tensor:
    return _packed_call(p, backbone, inputs, embed, cache).last_hidden_state


def _cache_argument(model: nn.Module) -> str:
    return next((name for name in _CACHE_ARGUMENTS if accepts(model, name)), "past_key_values")


def _new_cache(model: nn.Module, inputs: dict[str, Any]):
    """An empty cache for the packed call when ``inputs`` ask for one (``use_cache=True``)."""
    from transformers import DynamicCache

    return DynamicCache(config=model.config) if inputs.get("use_cache") else None


def _unpacked_cache(p: PackPlan, packed, config):
    """A packed call's cache in the padded layout ``(B, n_kv, L, d)``: each key and value at its
    row and column of the padded batch, zeros at padding (which the attention mask hides)."""
    from transformers import DynamicCache

    if packed is None:
        return None
    padded = DynamicCache(config=config)
    for index, layer in enumerate(packed.layers):
        keys = unpack(p, layer.keys.transpose(1, 2)).transpose(1, 2)
        values = unpack(p, layer.values.transpose(1, 2)).transpose(1, 2)
        padded.update(keys.contiguous(), values.contiguous(), index)
    return padded


def causal_lm_forward(p: PackPlan, model: nn.Module, inputs: dict[str, Any]) -> CausalLMOutputWithPast:
    """``model(**inputs)`` for a causal LM with ``logits_to_keep = k``, packed: logits ``(B, k, V)``
    at the real positions among each row's last ``k`` columns, zeros at padding."""
    mask = inputs["attention_mask"]
    B, L = mask.shape
    keep = inputs["logits_to_keep"]
    lookup = torch.full((B, L), -1, dtype=torch.long, device=mask.device)
    lookup[p.batch, p.column] = torch.arange(p.tokens, device=mask.device)
    wanted = lookup[:, L - keep :]  # (B, k): token number or -1
    rows, cols = (wanted >= 0).nonzero(as_tuple=True)
    token = wanted[rows, cols]
    cache = _new_cache(model, inputs)
    if PADDING_FREE_FAMILIES[model.config.model_type].logits == "head":
        hidden = _packed_backbone_call(p, model.base_model, inputs, model.get_input_embeddings(), cache)
        logits = model.get_output_embeddings()(hidden[p.bin[token], p.offset[token]])  # (n, V)
    else:  # the model's own forward computes the logits (its scaling, capping) at the wanted columns
        columns, where = torch.unique(p.offset[token], return_inverse=True)
        embed = model.get_input_embeddings()
        packed = _packed_call(p, model, inputs, embed, cache, logits_to_keep=columns).logits
        logits = packed[p.bin[token], where]  # (n, V)
    out = logits.new_zeros((B, keep, logits.shape[-1]))
    return CausalLMOutputWithPast(
        logits=out.index_put((rows, cols), logits), cache=_unpacked_cache(p, cache, model.config)
    )


def backbone_forward(p: PackPlan, backbone: nn.Module, inputs: dict[str, Any]) -> BaseModelOutputWithPast:
    """``backbone(**inputs)`` packed: ``last_hidden_state`` ``(B, L, H)``, zeros at padding."""
    cache = _new_cache(backbone, inputs)
    hidden = _packed_backbone_call(p, backbone, inputs, backbone.get_input_embeddings(), cache)
    return BaseModelOutputWithPast(
        last_hidden_state=unpack(p, hidden), cache=_unpacked_cache(p, cache, backbone.config)
    )


_PATHS = Recorder()


def recording() -> ContextManager[list[str]]:
    """Collect, for every model call and ``generate()`` meanwhile, ``"packed"`` or the reason it
    ran padded, and every call served from a method's prompt cache (:func:`record_prompt_cache`):
    what the conformance suite reports as the fast paths a cell took."""
    return _PATHS.recording()


def record_prompt_cache() -> None:
    """A call ran from the method's prompt cache (the prompts' keys/values instead of its tokens)."""
    _PATHS.add("prompt cache: served")


def _record(what: str, reason: str | None) -> None:
    _PATHS.add(f"{what}: packed" if reason is None else f"{what}: padded ({reason})")


def call(
    model: nn.Module,
    inputs: dict[str, Any],
    packing: bool,
    causal_lm: bool = True,
    while_packed: Callable[[PackPlan], ContextManager] | None = None,
    padded_because: str = "packing is off",
    method=None,
    after_call: Callable | None = None,
):
    """Call ``model`` on ``inputs`` (``None`` values dropped), packed when asked and possible.

    Whether a call is packed depends on the model and the kinds of inputs, never on the batch's
    contents: under ZeRO-3 every rank must run the same modules in the same order, and ranks
    see different batches. A batch without padding is packed too (into the same shape).
    ``while_packed(plan)``: a context the packed call runs in (per-example prefixes use it to
    learn where each example went). ``method``: the method calling, whose record is read.
    ``after_call(model, inputs, output)``: run after the call, packed or not, with the padded
    call's ``inputs`` and an output whose cache (if asked for) is in the padded layout; after any
    ``while_packed`` context has exited and while the caller's own call is still on (one-pass
    label-word scoring continues from the cache there).
    """
    inputs = {k: v for k, v in inputs.items() if v is not None}
    reason = unsupported_reason(model, inputs, causal_lm, method) if packing else padded_because
    flash = attention_kernel(model) == "flash_attention_2"
    if reason is None and flash and while_packed is not None:
        reason = "per-example prefixes cannot join flash_attention_2's variable-length rows"
    if _PATHS:
        _record("call", reason)
    if reason is None:
        p = plan(inputs["attention_mask"], pair_cost(model.config), one_row=flash)
        with while_packed(p) if while_packed is not None else contextlib.nullcontext():
            out = causal_lm_forward(p, model, inputs) if causal_lm else backbone_forward(p, model, inputs)
    else:
        out = model(**inputs)
    if after_call is not None:
        after_call(model, inputs, out)
    return out


# ----------------------------------------------------------------------------- generation


def prefill_unsupported_reason(
    model: nn.Module, inputs: dict[str, Any], generate_kwargs: dict[str, Any], method=None
) -> str | None:
    """Why :func:`prefill` cannot serve this ``generate()`` call, or ``None`` when it can: the
    model's record (:func:`pstar_plugins.mechanisms.fast_paths.of`), then what this call asks."""
    mask = inputs.get("attention_mask")
    if mask is None or mask.dim() != 2 or mask.shape[1] < 2:
        return "no 2D attention mask over at least two columns"
    decided = fast_paths.of(model, method).packed_prefill
    if decided is not None:
        return decided
    if any(generate_kwargs.get(name) is not None for name in _CACHE_ARGUMENTS):
        return "the caller passes a cache"
    config = generate_kwargs.get("generation_config") or model.generation_config
    for name in ("num_beams", "num_return_sequences"):
        if (generate_kwargs.get(name) or getattr(config, name, 1) or 1) != 1:
            return f"{name} > 1 (generate() would expand the rows, not a cache it did not make)"
    if generate_kwargs.get("use_cache") is False or getattr(config, "use_cache", True) is False:
        return "use_cache=False"
    if getattr(config, "cache_implementation", None) not in (None, "dynamic"):
        return f"cache_implementation={config.cache_implementation!r}"
    if bool(mask[:, :-1].all()):  # ranks may differ here: the record is off under ZeRO-3
        # nothing to unpad: the packed prefill would only add a call (the last column's)
        return "no padding in the prompts"
    return None


@torch.no_grad()
def prefill(model: nn.Module, inputs: dict[str, Any], while_packed: Callable[[PackPlan], ContextManager] | None = None):
    """The KV cache of every column of ``inputs`` but the last, computed padding-free.

    ``generate()`` on a left-padded batch runs its first forward on every column of every row.
    Here the real positions before the last column are packed (:func:`plan`), run once with a
    cache, and the cache is scattered back to the padded layout (zeros at padding, which the
    attention mask hides). ``generate()`` then receives the full inputs with this cache and
    runs only the last column (transformers slices inputs that a cache already covers). Key
    and value positions are those of the padded call, so greedy outputs equal the unpacked
    ``generate()``'s up to float rounding (tested).
    """
    from transformers import DynamicCache

    head = {
        k: v[:, :-1] for k, v in inputs.items() if k in ("input_ids", "inputs_embeds", "attention_mask", "position_ids")
    }
    if head.get("position_ids") is None:
        head["position_ids"] = positions_from_mask(head["attention_mask"])
    p = plan(head["attention_mask"], pair_cost(model.config))
    packed = DynamicCache(config=model.config)
    with while_packed(p) if while_packed is not None else contextlib.nullcontext():
        _packed_backbone_call(p, model.base_model, head, model.get_input_embeddings(), cache=packed)
    return _unpacked_cache(p, packed, model.config)


def generate(
    model: nn.Module,
    inputs: dict[str, Any],
    packing: bool,
    while_packed: Callable[[PackPlan], ContextManager] | None = None,
    method=None,
    **kwargs,
):
    """``model.generate(**inputs, **kwargs)`` (``None`` inputs dropped), with the prompt's cache
    from :func:`prefill` when ``packing`` is on and the call allows it."""
    inputs = {k: v for k, v in inputs.items() if v is not None}
    reason = prefill_unsupported_reason(model, inputs, kwargs, method) if packing else "packing is off"
    if _PATHS:
        _record("prefill", reason)
    if reason is None:
        kwargs[_cache_argument(model)] = prefill(model, inputs, while_packed)
    return model.generate(**inputs, **kwargs)

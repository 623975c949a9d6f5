"""Padding-free calls of a decoder-only model on a padded batch.

A padded batch of ``B`` rows of length ``L`` costs ``B·L`` token positions in every layer, real
or not; SST-2 training batches are about half padding, and prompt tuning adds ``m`` real
positions to every row. Here the real positions of all rows are packed, first-fit decreasing,
into bins (see :func:`plan` for their length); every bin is one row of the call, and a 4D mask keeps
each example to itself (causal within its own tokens, never across examples). Each token keeps
the position id it had in the padded batch, so rotary and learned positions are unchanged, and
the outputs at real positions equal the padded call's up to float rounding (tests check it,
values and gradients, for every method on Llama and GPT-2 geometries).

A plan is never dearer than the padded call by that cost model (its first candidate has at most
``B`` bins no longer than the longest row). Attention stays within a bin, so its cost does not grow with ``B`` (one long row with
a block-diagonal mask would make it quadratic in the batch's tokens).

The same idea as padding-free training with flash-attention's variable-length kernel
(transformers#31629) and TRL's first-fit-decreasing packing (trl#3526), done inside the model
call with an explicit mask: no collator change, the ``sdpa`` and ``eager`` kernels on any
device (``flex_attention`` gets the same pattern as a block mask; ``flash_attention_2`` one row
with transformers' ``cu_seq_lens`` kwargs, see :func:`varlen_kwargs`), and per-layer prefixes
(the prefix columns that ``core.attention`` prepends are visible from every bin).

Applicability is checked, not assumed (:func:`unsupported_reason`); a call that cannot be
packed runs padded. A call that asks for its KV cache (``use_cache=True``, none passed in) is
packed too and returns the cache in the padded layout, so that a caller can continue every row
from it (one-pass label-word scoring does); a call that passes a cache in runs padded.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Callable, ContextManager

import torch
from torch import nn
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast

from pstar_plugins.core.attention import UNVERIFIED_KERNELS_ENV, opted_in, varlen_kwargs_from_lengths
from pstar_plugins.core.distributed import is_partitioned
from pstar_plugins.core.inputs import accepts, is_encoder_decoder, positions_from_mask
from pstar_plugins.core.recording import Recorder

#: kernels that take the packed call's mask as a tensor, on every family of PADDING_FREE_FAMILIES
_MASK_KERNELS = ("sdpa", "eager")
#: families whose packed calls on flex_attention (a block mask built from the plan) are checked
#: against sdpa's by tests/test_flex_attention.py: one mask per call, and one per layer type
FLEX_PACKING_FAMILIES = frozenset({"llama", "qwen2"})


@dataclass(frozen=True)
class Family:
    """How a model family's padding-free call is made, as the conformance matrix verified it.

    ``logits``: ``"head"`` when the family's logits are its output embeddings applied to the last
    hidden state and nothing else (they are computed for the wanted positions only), ``"forward"``
    when the family's own forward scales or caps them (the packed call then runs the model's own
    forward and keeps the wanted columns). ``layer_masks``: the forward takes one mask per layer
    type (``config.layer_types``) as a dict, needed when some layers use a sliding window.
    """

    logits: str = "head"
    layer_masks: bool = False


_HEAD, _FORWARD = Family("head"), Family("forward")
#: the families whose padding-free calls tests/test_matrix.py checks against the padded call
#: (values and gradients, prompt cache and packed prefill): every other family runs padded
PADDING_FREE_FAMILIES: dict[str, Family] = {
    "llama": _HEAD, "mistral": _HEAD, "mixtral": _HEAD, "qwen2": Family("head", True), "qwen3": Family("head", True),
    "qwen3_moe": _HEAD, "gemma": _HEAD, "gemma2": Family("forward", True), "gemma3_text": Family("forward", True),
    "phi": _HEAD, "phi3": _HEAD, "gpt2": _HEAD, "gpt_neox": _HEAD, "gptj": _HEAD, "gpt_bigcode": _HEAD, "opt": _HEAD,
    "starcoder2": _HEAD, "olmo2": _HEAD, "cohere": _FORWARD, "granite": _FORWARD, "stablelm": _HEAD,
    "smollm3": Family("head", True), "deepseek_v3": _HEAD,
    "falcon": _HEAD,  # through transformers' attention interface since transformers 5.25
}


def family_reason(model: nn.Module) -> str | None:
    """Why ``model``'s family has no verified padding-free path, or ``None``."""
    model_type = getattr(model.config, "model_type", None)
    family = PADDING_FREE_FAMILIES.get(model_type)
    if family is None:
        return f"model type {model_type!r} is not verified for padding-free calls (see docs/architectures.md)"
    types = set(getattr(model.config, "layer_types", None) or ())
    if types - {"full_attention", "sliding_attention"}:
        return f"layer types {sorted(types - {'full_attention', 'sliding_attention'})} have no packed mask"
    if "sliding_attention" in types and not family.layer_masks:
        return f"model type {model_type!r} takes one mask for layers of several types"
    return None
_CACHE_ARGUMENTS = ("cache", "past_key_values")  # transformers renamed past_key_values to cache in 5.x


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


def kernel_reason(model: nn.Module) -> str | None:
    """Why the packed call cannot build a mask for ``model``'s attention kernel, or ``None``."""
    kernel = _attention_kernel(model)
    if kernel in _MASK_KERNELS:
        return None
    if kernel == "flex_attention":
        if model.config.model_type in FLEX_PACKING_FAMILIES:
            return None
        return (f"flex_attention packing is verified for {sorted(FLEX_PACKING_FAMILIES)} only, "
                f"not model type {model.config.model_type!r}")
    if kernel == "flash_attention_2":
        if opted_in(kernel):
            return None
        return ("flash_attention_2 packing (one row, transformers' variable-length path) is not yet verified on a GPU; "
                f"bench/gpu_check.sh runs it with {UNVERIFIED_KERNELS_ENV}=flash_attention_2")
    return (f"attention kernel {kernel!r} (needs sdpa or eager, flex_attention on {sorted(FLEX_PACKING_FAMILIES)}, or "
            f"flash_attention_2 with {UNVERIFIED_KERNELS_ENV}=flash_attention_2)")


def masks(p: PackPlan, model: nn.Module, dtype: torch.dtype):
    """The packed call's attention mask: one block mask, windowed when every layer slides, or one
    per layer type (``config.layer_types``) when the family takes them as a dict; ``None`` when the
    plan is :attr:`PackPlan.unpadded`, so that attention runs with ``is_causal`` and no mask (the
    model builds its own sliding-window mask where a layer needs one), as the plain call would."""
    kernel = _attention_kernel(model)
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
    if _attention_kernel(model) != "flash_attention_2":
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


def _attention_kernel(model: nn.Module) -> str | None:
    return getattr(model.config, "_attn_implementation", None)


def uses_cache(inputs: dict[str, Any]) -> bool:
    """Whether a model call's ``inputs`` pass or ask for a KV cache."""
    return any(inputs.get(name) is not None for name in _CACHE_ARGUMENTS) or bool(inputs.get("use_cache"))


def unsupported_reason(model: nn.Module, inputs: dict[str, Any], causal_lm: bool) -> str | None:
    """Why this call cannot be packed, or ``None`` when it can. ``causal_lm``: ``model`` is a
    causal LM (logits wanted); otherwise it is the backbone of a decoder-only model."""
    mask = inputs.get("attention_mask")
    if mask is None or mask.dim() != 2:
        return "no 2D attention mask (nothing to unpad)"
    if is_encoder_decoder(model):
        return "encoder-decoder model"
    family = family_reason(model)
    if family is not None:
        return family
    if inputs.get("position_ids") is None:
        return "the model takes no position_ids"
    kernel = kernel_reason(model)
    if kernel is not None:
        return kernel
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


def _packed_backbone_call(p: PackPlan, backbone: nn.Module, inputs: dict[str, Any], embed: nn.Module,
                          cache=None) -> torch.Tensor:
    embeds = inputs.get("inputs_embeds")
    if embeds is None:
        embeds = embed(inputs["input_ids"])
    call = {k: v for k, v in inputs.items() if k not in ("input_ids", "inputs_embeds", "attention_mask", "position_ids",
                                                          "logits_to_keep", "labels", "use_cache", *_CACHE_ARGUMENTS)}
    if cache is not None:
        call[_cache_argument(backbone)] = cache
    out = backbone(inputs_embeds=pack(p, embeds), position_ids=pack(p, inputs["position_ids"]),
                   attention_mask=masks(p, backbone, embeds.dtype), use_cache=cache is not None,
                   **varlen_kwargs(p, backbone), **call)
    return out.last_hidden_state


def _cache_argument(model: nn.Module) -> str:
    return next((name for name in _CACHE_ARGUMENTS if accepts(model, name)), "past_key_values")


def has_sliding_layers(config) -> bool:
    """Whether some attention layer of ``config`` keeps only a window (its cache too)."""
    return bool(getattr(config, "sliding_window", None)) or any(
        t != "full_attention" for t in getattr(config, "layer_types", None) or ())


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
    wanted = lookup[:, L - keep:]  # (B, k): token number or -1
    rows, cols = (wanted >= 0).nonzero(as_tuple=True)
    token = wanted[rows, cols]
    cache = _new_cache(model, inputs)
    if PADDING_FREE_FAMILIES[model.config.model_type].logits == "head":
        hidden = _packed_backbone_call(p, model.base_model, inputs, model.get_input_embeddings(), cache)
        logits = model.get_output_embeddings()(hidden[p.bin[token], p.offset[token]])  # (n, V)
    else:  # the model's own forward computes the logits (its scaling, capping) at the wanted columns
        columns, where = torch.unique(p.offset[token], return_inverse=True)
        embeds = inputs.get("inputs_embeds")
        if embeds is None:
            embeds = model.get_input_embeddings()(inputs["input_ids"])
        call = {k: v for k, v in inputs.items() if k not in ("input_ids", "inputs_embeds", "attention_mask", "position_ids",
                                                              "logits_to_keep", "labels", "use_cache", *_CACHE_ARGUMENTS)}
        if cache is not None:
            call[_cache_argument(model)] = cache
        packed = model(inputs_embeds=pack(p, embeds), position_ids=pack(p, inputs["position_ids"]),
                       attention_mask=masks(p, model, embeds.dtype), use_cache=cache is not None, logits_to_keep=columns,
                       **varlen_kwargs(p, model), **call).logits
        logits = packed[p.bin[token], where]  # (n, V)
    out = logits.new_zeros((B, keep, logits.shape[-1]))
    return CausalLMOutputWithPast(logits=out.index_put((rows, cols), logits), cache=_unpacked_cache(p, cache, model.config))


def backbone_forward(p: PackPlan, backbone: nn.Module, inputs: dict[str, Any]) -> BaseModelOutputWithPast:
    """``backbone(**inputs)`` packed: ``last_hidden_state`` ``(B, L, H)``, zeros at padding."""
    cache = _new_cache(backbone, inputs)
    hidden = _packed_backbone_call(p, backbone, inputs, backbone.get_input_embeddings(), cache)
    return BaseModelOutputWithPast(last_hidden_state=unpack(p, hidden), cache=_unpacked_cache(p, cache, backbone.config))


_PATHS = Recorder()


def recording() -> ContextManager[list[str]]:
    """Collect, for every model call and ``generate()`` meanwhile, ``"packed"`` or the reason it
    ran padded (what the conformance suite reports as the fast path a cell took)."""
    return _PATHS.recording()


def _record(what: str, reason: str | None) -> None:
    _PATHS.add(f"{what}: packed" if reason is None else f"{what}: padded ({reason})")


def call(model: nn.Module, inputs: dict[str, Any], packing: bool, causal_lm: bool = True,
         while_packed: Callable[[PackPlan], ContextManager] | None = None, padded_because: str = "packing is off"):
    """Call ``model`` on ``inputs`` (``None`` values dropped), packed when asked and possible.

    Whether a call is packed depends on the model and the kinds of inputs, never on the batch's
    contents: under ZeRO-3 every rank must run the same modules in the same order, and ranks
    see different batches. A batch without padding is packed too (into the same shape).
    ``while_packed(plan)``: a context the packed call runs in (per-example prefixes use it to
    learn where each example went).
    """
    inputs = {k: v for k, v in inputs.items() if v is not None}
    reason = unsupported_reason(model, inputs, causal_lm) if packing else padded_because
    flash = _attention_kernel(model) == "flash_attention_2"
    if reason is None and flash and while_packed is not None:
        reason = "per-example prefixes cannot join flash_attention_2's variable-length rows"
    if _PATHS:
        _record("call", reason)
    if reason is None:
        p = plan(inputs["attention_mask"], pair_cost(model.config), one_row=flash)
        _RUNNING.append(model)
        try:
            with while_packed(p) if while_packed is not None else contextlib.nullcontext():
                out = causal_lm_forward(p, model, inputs) if causal_lm else backbone_forward(p, model, inputs)
        finally:
            _RUNNING.pop()
        if out.cache is not None:
            for observer in list(_CACHE_OBSERVERS):
                observer(model, (), inputs, out)
        return out
    return model(**inputs)


# ----------------------------------------------------------------------------- packed calls that keep their cache
#
# A call with ``use_cache=True`` (and no cache passed in) is packed like any other and returns its
# cache in the padded layout (:func:`_unpacked_cache`), so a caller can continue every row from it.
# A forward hook on ``model`` does not see such a call as the padded one (the head families never
# call ``model`` itself; the others call it on the packed layout): :func:`observing_cached_calls`
# is the hook's counterpart, and :func:`packed_call_running` tells a hook to leave the call to it.

_CACHE_OBSERVERS: list[Callable] = []
_RUNNING: list[nn.Module] = []  # the models inside a packed call now


@contextlib.contextmanager
def observing_cached_calls(observer: Callable):
    """Within: after every packed call that returns its cache, ``observer(model, (), inputs, output)``
    with the padded call's ``inputs`` (2D mask, position ids) and its output, whose cache is in the
    padded layout: what a ``with_kwargs`` forward hook on ``model`` would get had the call run padded.
    It runs after any ``while_packed`` context has exited and while the caller's call is still on."""
    _CACHE_OBSERVERS.append(observer)
    try:
        yield
    finally:
        _CACHE_OBSERVERS.remove(observer)


def packed_call_running(model: nn.Module) -> bool:
    """Whether ``model`` is inside one of this module's packed calls (whose calls of ``model``
    itself, if any, are on the packed layout)."""
    return any(m is model for m in _RUNNING)


# ----------------------------------------------------------------------------- generation


def prefill_unsupported_reason(model: nn.Module, inputs: dict[str, Any], generate_kwargs: dict[str, Any]) -> str | None:
    """Why :func:`prefill` cannot serve this ``generate()`` call, or ``None`` when it can."""
    mask = inputs.get("attention_mask")
    if mask is None or mask.dim() != 2 or mask.shape[1] < 2:
        return "no 2D attention mask over at least two columns"
    if is_encoder_decoder(model) or not model.can_generate():
        return "not a decoder-only causal LM"
    family = family_reason(model)
    if family is not None:
        return family
    kernel = kernel_reason(model)
    if kernel is not None:
        return kernel
    if _attention_kernel(model) == "flash_attention_2":
        return "packed prefill is not written for flash_attention_2 (generate() runs its own first forward)"
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
    if has_sliding_layers(model.config):
        return "sliding-window attention layers"
    if any(is_partitioned(p) for p in model.parameters()):
        # the choice below depends on the batch's padding, and ZeRO-3 ranks must agree on the
        # number of forward calls (each gathers every layer's weights)
        return "ZeRO-3 partitioned weights"
    if bool(mask[:, :-1].all()):
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

    head = {k: v[:, :-1] for k, v in inputs.items() if k in ("input_ids", "inputs_embeds", "attention_mask", "position_ids")}
    if head.get("position_ids") is None:
        head["position_ids"] = positions_from_mask(head["attention_mask"])
    p = plan(head["attention_mask"], pair_cost(model.config))
    packed = DynamicCache(config=model.config)
    with while_packed(p) if while_packed is not None else contextlib.nullcontext():
        _packed_backbone_call(p, model.base_model, head, model.get_input_embeddings(), cache=packed)
    return _unpacked_cache(p, packed, model.config)


def generate(model: nn.Module, inputs: dict[str, Any], packing: bool,
             while_packed: Callable[[PackPlan], ContextManager] | None = None, **kwargs):
    """``model.generate(**inputs, **kwargs)`` (``None`` inputs dropped), with the prompt's cache
    from :func:`prefill` when ``packing`` is on and the call allows it."""
    inputs = {k: v for k, v in inputs.items() if v is not None}
    reason = prefill_unsupported_reason(model, inputs, kwargs) if packing else "packing is off"
    if _PATHS:
        _record("prefill", reason)
    if reason is None:
        kwargs[_cache_argument(model)] = prefill(model, inputs, while_packed)
    return model.generate(**inputs, **kwargs)

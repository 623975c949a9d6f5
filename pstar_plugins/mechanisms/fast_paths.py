"""One decision per model: which fast paths apply to it, and why not.

Four paths make a call cheaper without changing its numbers: **packing** (padding-free calls,
:mod:`pstar_plugins.mechanisms.packing`), the **packed prefill** of ``generate()``, the **prompt
cache** (prompt tuning serving its virtual tokens' keys and values instead of the tokens), and
**one-pass scoring** of multi-token label words (:mod:`pstar_plugins.tasks.verbalizer`). Each is
allowed by evidence: the conformance matrix checks it on a family, against the plain call, before
the family is named here (docs/architectures.md).

What depends on the model and the method alone (its family, kernel, encoder-decoder or not,
sliding-window layers, ZeRO-3 partitioning, what the method declares) is decided once, by
:func:`decide`, into a :class:`FastPaths` record that every call site reads (:func:`of`) and the
run summary shows. What depends on one call (a cache passed in, labels, beams) is checked by that
call, never the batch's contents where ranks must agree (ZeRO-3 runs the same calls on every rank).
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

from torch import nn

from pstar_plugins.contract.spec import has_classifier_head
from pstar_plugins.mechanisms.attention_kernels import UNVERIFIED_KERNELS_ENV, opted_in
from pstar_plugins.mechanisms.distributed import is_partitioned
from pstar_plugins.mechanisms.inputs import is_encoder_decoder
from pstar_plugins.mechanisms.pack_plan import attention_kernel

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
#: (values and gradients, prompt cache, packed prefill and one-pass scoring): every other family
#: runs padded
PADDING_FREE_FAMILIES: dict[str, Family] = {
    "llama": _HEAD,
    "mistral": _HEAD,
    "mixtral": _HEAD,
    "qwen2": Family("head", True),
    "qwen3": Family("head", True),
    "qwen3_moe": _HEAD,
    "gemma": _HEAD,
    "gemma2": Family("forward", True),
    "gemma3_text": Family("forward", True),
    "phi": _HEAD,
    "phi3": _HEAD,
    "gpt2": _HEAD,
    "gpt_neox": _HEAD,
    "gptj": _HEAD,
    "gpt_bigcode": _HEAD,
    "opt": _HEAD,
    "starcoder2": _HEAD,
    "olmo2": _HEAD,
    "cohere": _FORWARD,
    "granite": _FORWARD,
    "stablelm": _HEAD,
    "smollm3": Family("head", True),
    "deepseek_v3": _HEAD,
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


#: families whose one-pass label-word scores and gradients the same matrix checks against the
#: per-class loop (the suite's ``one_pass_scoring``; sliding-window layers included, windowed by
#: the model's own masks): every family verified padding-free passes it. Every other family is
#: scored per class.
ONE_PASS_FAMILIES = frozenset(PADDING_FREE_FAMILIES)


def has_sliding_layers(config) -> bool:
    """Whether some attention layer of ``config`` keeps only a window (its cache too)."""
    return bool(getattr(config, "sliding_window", None)) or any(
        t != "full_attention" for t in getattr(config, "layer_types", None) or ()
    )


def kernel_reason(model: nn.Module) -> str | None:
    """Why the packed call cannot build a mask for ``model``'s attention kernel, or ``None``."""
    kernel = attention_kernel(model)
    if kernel in _MASK_KERNELS:
        return None
    if kernel == "flex_attention":
        if model.config.model_type in FLEX_PACKING_FAMILIES:
            return None
        return (
            f"flex_attention packing is verified for {sorted(FLEX_PACKING_FAMILIES)} only, "
            f"not model type {model.config.model_type!r}"
        )
    if kernel == "flash_attention_2":
        if opted_in(kernel):
            return None
        return (
            "flash_attention_2 packing (one row, transformers' variable-length path) is not yet verified on a GPU; "
            f"bench/gpu_check.sh runs it with {UNVERIFIED_KERNELS_ENV}=flash_attention_2"
        )
    return (
        f"attention kernel {kernel!r} (needs sdpa or eager, flex_attention on {sorted(FLEX_PACKING_FAMILIES)}, or "
        f"flash_attention_2 with {UNVERIFIED_KERNELS_ENV}=flash_attention_2)"
    )


@dataclass(frozen=True)
class FastPaths:
    """Which fast paths apply to one model (``None``) and why each other one does not (its reason)."""

    packing: str | None
    packed_prefill: str | None
    prompt_cache: str | None
    one_pass_scoring: str | None
    partitioned: bool = False  #: decided on ZeRO-3 partitioned weights (a later partitioning redecides)

    def lines(self) -> list[str]:
        """One line per path, for the run summary: ``packing: applies`` or ``packing: does not
        apply (reason)``. A path that applies still runs only where a call allows it (and
        packing only with ``PStarModel.packing`` on)."""
        return [
            f"{f.name.replace('_', ' ')}: "
            + ("applies" if getattr(self, f.name) is None else f"does not apply ({getattr(self, f.name)})")
            for f in fields(self)
            if f.name != "partitioned"
        ]


def _first(*reasons: str | None) -> str | None:
    return next((r for r in reasons if r), None)


def _causal_reason(model: nn.Module) -> str | None:
    if is_encoder_decoder(model) or not getattr(model, "can_generate", lambda: False)():
        return "not a decoder-only causal LM"
    return None


def _one_pass_method_reason(method: Any) -> str | None:
    # a subclass could change the continuation's own tokens, which the continuation pass would not
    # see: only the class that declares the promise is trusted (PromptMethod.one_pass_continuations)
    if not vars(type(method)).get("one_pass_continuations", False):
        return f"method {type(method).__name__} does not declare one_pass_continuations"
    if has_classifier_head(method.config):
        return f"{type(method).__name__} with a classification head scores through its head"
    return None


def _prompt_cache_method_reason(model: nn.Module, method: Any) -> str | None:
    if method is None:
        return "no method serves a prompt cache"
    reason_of = getattr(method, "prompt_cache_reason", None)
    if reason_of is None:
        return f"method {type(method).__name__} keeps its virtual tokens in the sequence"
    return reason_of(model)


def decide(model: nn.Module, method: Any = None) -> FastPaths:
    """The record for ``model`` (the frozen model a method calls, or a bare one) and ``method``."""
    config = model.config
    partitioned = any(is_partitioned(p) for p in model.parameters())
    zero3 = "ZeRO-3 partitioned weights" if partitioned else None
    sliding = (
        "sliding-window attention layers (their cache keeps only the window)" if has_sliding_layers(config) else None
    )
    encoder_decoder = "encoder-decoder model" if is_encoder_decoder(model) else None
    family = family_reason(model)
    packing = _first(encoder_decoder, family, kernel_reason(model))
    flash = (
        "packed prefill is not written for flash_attention_2 (generate() runs its own first forward)"
        if attention_kernel(model) == "flash_attention_2"
        else None
    )
    # the packed prefill's choice depends on the batch's padding, and ZeRO-3 ranks must agree on
    # the number of forward calls (each gathers every layer's weights)
    prefill = _first(_causal_reason(model), packing, flash, sliding, zero3)
    # the prompt cache is not verified under ZeRO-3 (the conformance matrix runs one process)
    prompt_cache = _first(_causal_reason(model), family, sliding, zero3, _prompt_cache_method_reason(model, method))
    one_family = (
        None
        if config.model_type in ONE_PASS_FAMILIES
        else f"model type {config.model_type!r} is not verified for one-pass scoring"
    )
    # the continuation pass runs inside the frozen model's call, which ZeRO-3's parameter-fetching
    # hooks are not known to allow
    # sliding-window layers are scored over a cache of whole layers, windowed by the model's masks
    one_pass = _first(
        _causal_reason(model), one_family, _one_pass_method_reason(method) if method is not None else None, zero3
    )
    return FastPaths(packing, prefill, prompt_cache, one_pass, partitioned)


_RECORD = "_pstar_fast_paths"


def of(model: nn.Module, method: Any = None) -> FastPaths:
    """The record of ``model`` with ``method``: decided on the first ask (``build_model`` asks at
    build time) and kept with the method (or the bare model). It is decided again only when the
    weights' ZeRO-3 partitioning changed since (Accelerate partitions a model built before
    ``prepare``) or the method's class did; a model's config is read once, at that decision.
    A method keeps one record, decided on the frozen model it was built on: its calls of a part
    of that model (P-tuning v2's backbone without the LM head) read the same record."""
    holder = method if method is not None else model
    kept: dict[tuple, FastPaths] = holder.__dict__.setdefault(_RECORD, {})
    key = (None if method is not None else id(model), type(method))
    record = kept.get(key)
    if record is None or record.partitioned != is_partitioned(next(model.parameters(), None)):
        record = kept[key] = decide(model, method)
    return record

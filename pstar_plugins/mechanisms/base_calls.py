"""The two helpers a method calls to run the frozen model: one forward and one generation, each
padding-free when the method's :attr:`~pstar_plugins.contract.method.PromptMethod.packing` is on
and the call allows it (:mod:`pstar_plugins.mechanisms.packing`)."""

from __future__ import annotations

from typing import Any

from torch import nn

from pstar_plugins.contract.method import CONTINUATION
from pstar_plugins.mechanisms import packing


def call_base(
    method, model: nn.Module, inputs: dict[str, Any], causal_lm: bool = True, packable: bool = True, while_packed=None
):
    """Call the frozen ``model`` (a causal LM, or with ``causal_lm=False`` a decoder-only
    backbone) on ``inputs`` (``None`` values dropped), padding-free when ``method.packing`` is
    on, the method says this call may be packed (``packable``) and the call allows it;
    ``while_packed``: see :func:`pstar_plugins.mechanisms.packing.call`. Inside
    :meth:`~pstar_plugins.contract.capabilities.OnePassContinuations.continuing`, the continuation runs
    after the call, still inside the method's own call (one-pass label-word scoring)."""
    after_call = method.__dict__.get(CONTINUATION)
    if method.packing and not packable:
        return packing.call(
            model,
            inputs,
            False,
            causal_lm,
            while_packed,
            method=method,
            after_call=after_call,
            padded_because=f"{type(method).__name__} runs this call padded",
        )
    return packing.call(model, inputs, method.packing, causal_lm, while_packed, method=method, after_call=after_call)


def generate_base(method, model: nn.Module, inputs: dict[str, Any], while_packed=None, **kwargs):
    """``model.generate(**inputs, **kwargs)``; when ``method.packing`` is on, the prompt's KV
    cache is computed padding-free first (:func:`pstar_plugins.mechanisms.packing.prefill`)."""
    return packing.generate(model, inputs, method.packing, while_packed, method=method, **kwargs)

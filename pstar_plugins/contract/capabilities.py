"""Opt-in capabilities of a method: small mixins a :class:`~pstar_plugins.contract.method.PromptMethod`
subclass adds when it can do more than the contract asks. The core asks ``isinstance`` (or, for
:class:`OnePassContinuations`, the class's own declaration) and otherwise takes the plain path or
refuses with a message naming the capability. docs/method_contract.md, "Opt-in capabilities".
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable, ClassVar, Mapping

import torch
from torch import nn

from pstar_plugins.contract.errors import AdapterError
from pstar_plugins.contract.method import CONTINUATION, PeftPrompt


class OnePassContinuations:
    """Multi-token label words may be scored from the frozen model's cache in one pass.

    Declaring it promises that everything the method adds to an input lies in the frozen model's
    cache (virtual tokens, template slots) or in prefixes active for the frozen model's whole call,
    and that the method calls the frozen model once per forward through
    :func:`~pstar_plugins.mechanisms.base_calls.call_base`, which runs the continuation the scorer
    hands over (:meth:`continuing`) after that call. The mixin gives :meth:`continuing`; the
    promise is ``one_pass_continuations = True`` in the class's own body. Only that class is
    trusted: a subclass that changes how inputs are built must check the promise and declare it
    again.
    """

    #: the declaration: ``True`` in the body of the class that keeps the promise (never inherited)
    one_pass_continuations: ClassVar[bool] = False

    @contextlib.contextmanager
    def continuing(self, continuation: Callable[[nn.Module, dict[str, Any], Any], None]):
        """Within: after each call of the frozen model, ``continuation(model, inputs, output)``."""
        previous = self.__dict__.get(CONTINUATION)
        self.__dict__[CONTINUATION] = continuation
        try:
            yield
        finally:
            self.__dict__[CONTINUATION] = previous


class PeftExport:
    """The adapter has a PEFT prompt-learning equivalent (``pstar export``; with ``peft_types`` on
    the spec, ``pstar import-peft`` too)."""

    def peft_export(self, base_model: nn.Module) -> PeftPrompt:
        """The adapter in PEFT's layout (called on a folded model with one task). Raise
        :class:`AdapterError` naming the reason when this config has no PEFT equivalent."""
        raise NotImplementedError

    @classmethod
    def peft_options(cls, peft_config: Mapping[str, Any]) -> dict[str, Any]:
        """Config options that build this method for a PEFT adapter (``adapter_config.json``) of a
        type listed in the spec's ``peft_types``; :meth:`state_from_peft` then gives its tensors."""
        raise AdapterError(f"{cls.__name__} cannot be built from a PEFT adapter.")

    def state_from_peft(self, base_model: nn.Module, embeddings: torch.Tensor) -> dict[str, torch.Tensor]:
        """The ``trainable_state`` that PEFT's ``prompt_embeddings`` tensor stands for (the inverse
        of :meth:`peft_export`), for a module built with :meth:`peft_options`."""
        raise AdapterError(f"{type(self).__name__} cannot load a PEFT adapter.")


class TokenizerCheck:
    """The method can refuse a config from the tokenizer alone, before the model loads."""

    @classmethod
    def check_tokenizer(cls, config, tokenizer) -> None:
        """Refuse ``config`` for what ``tokenizer`` alone shows it cannot do (P-tuning v2: label
        words that tokenise to nothing or start alike), so that ``pstar train`` says so before the
        model loads; for ``--init-from-adapter`` it gets ``config.for_loading()``. Construction
        must still check the same (``build_model`` from Python never calls this)."""
        raise NotImplementedError


class CheckpointContext:
    """The method's layers read state that gradient checkpointing must restore when it recomputes
    them (prefix methods: the prefixes active for the call)."""

    def checkpoint_context(self):
        """``context_fn`` for non-reentrant gradient checkpointing: (forward, recompute) contexts."""
        raise NotImplementedError


class PromptCache:
    """The method can serve inference from its prompts' keys and values instead of their tokens
    (prompt tuning). The record of :mod:`pstar_plugins.mechanisms.fast_paths` asks
    :meth:`prompt_cache_reason` once per model."""

    def prompt_cache_reason(self, base_model: nn.Module) -> str | None:
        """Why this method and config cannot serve from the cache on ``base_model``, or ``None``."""
        raise NotImplementedError

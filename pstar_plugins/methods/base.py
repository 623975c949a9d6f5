"""The method contract: :class:`PromptMethod`, the one class a method author implements, with
its spec and config (the torch-free parts live in :mod:`pstar_plugins.methods.spec` and are
re-exported here). ``docs/method_contract.md`` documents every member: when the core calls it
and what it may assume.

A third-party method subclasses :class:`MethodConfig` and :class:`PromptMethod` and registers a
:class:`MethodSpec` naming both, exactly like the built-ins do.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any, Mapping

import torch
from torch import nn

from pstar_plugins.errors import AdapterError, ConfigError
from pstar_plugins.methods.spec import DEFAULT_PRESET, MethodConfig, MethodPlugin, MethodSpec, Preset, one_of, positive_int  # noqa: F401


# ----------------------------------------------------------------------------- module


@dataclass
class PeftPrompt:
    """What a method exports to PEFT's prompt-learning layout (``PromptMethod.peft_export``).

    ``peft_type``: PEFT's ``PROMPT_TUNING``, ``P_TUNING`` or ``PREFIX_TUNING``;
    ``embeddings``: the one tensor PEFT saves, ``prompt_embeddings`` ``(m, width)``;
    ``config``: the ``adapter_config.json`` fields particular to that type (the exporter adds
    the common ones: type, task, virtual tokens, base model).
    """

    peft_type: str
    embeddings: torch.Tensor
    config: dict[str, Any] = field(default_factory=dict)


class PromptMethod(nn.Module):
    """The method contract: a method's trainable module and every decision about it.

    Built by its spec (``MethodSpec.create``: ``cls(config, base_model, tokenizer=...)``), then
    called by the core: :meth:`run` for ``forward``, :meth:`generate` for generation,
    :meth:`trainable_parameter_names` when freezing, :meth:`param_groups` for the optimizer,
    :meth:`trainable_state` / :meth:`load_trainable_state` for adapter files,
    :meth:`adapter_geometry` for what the file records, :meth:`fold` for inference,
    :meth:`peft_export` for ``pstar export`` (and :meth:`peft_options` /
    :meth:`state_from_peft` for ``pstar import-peft``). Every tensor this module owns is trainable and
    kept in fp32 (master weights), whatever the base model's dtype.
    """

    config: MethodConfig
    #: run the frozen model padding-free where possible (``core.packing``); set by ``PStarModel.packing``
    packing: bool = False
    #: the class guarantees that everything it adds to an input lies in the frozen model's cache
    #: (virtual tokens, template slots) or in prefixes active for the frozen model's whole call, so
    #: label-word continuations may be scored from that cache in one pass (tasks.verbalizer). Read
    #: from the class that declares it: a subclass must declare it again after checking.
    one_pass_continuations: bool = False

    def __init__(self, config: MethodConfig) -> None:
        super().__init__()
        self.config = config
        self._disabled = False

    # -- switching the contribution off -------------------------------------------------
    @contextlib.contextmanager
    def disabled(self):
        """While active, the method contributes nothing: the wrapped model computes what the bare
        base model computes on the same inputs (positions, masks and outputs untouched; a method
        with its own output head still applies it to the base model's hidden states). Every
        ``run`` and ``generate`` must honour :attr:`contributing`; the conformance suite
        (``pstar_plugins.testing.conformance``) checks it against the bare model."""
        previous = self._disabled
        self._disabled = True
        try:
            yield
        finally:
            self._disabled = previous

    @property
    def contributing(self) -> bool:
        """``False`` inside :meth:`disabled`."""
        return not self._disabled

    def example_inputs(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> dict[str, Any]:
        """Extra inputs the method needs for a batch of token ids (``(B, L)``, real tokens where
        ``attention_mask`` is 1), e.g. P-tuning's ``prompt_index``. The conformance suite builds
        its batches with it; default: none."""
        return {}

    def call_base(self, model: nn.Module, inputs: dict[str, Any], causal_lm: bool = True, packable: bool = True,
                  while_packed=None):
        """Call the frozen ``model`` (a causal LM, or with ``causal_lm=False`` a decoder-only
        backbone) on ``inputs`` (``None`` values dropped), padding-free when :attr:`packing` is
        on, the method says this call may be packed (``packable``) and the call allows it;
        ``while_packed``: see :func:`pstar_plugins.core.packing.call`."""
        from pstar_plugins.core import packing

        if self.packing and not packable:
            return packing.call(model, inputs, False, causal_lm, while_packed,
                                padded_because=f"{type(self).__name__} runs this call padded")
        return packing.call(model, inputs, self.packing, causal_lm, while_packed)

    def generate_base(self, model: nn.Module, inputs: dict[str, Any], while_packed=None, **kwargs):
        """``model.generate(**inputs, **kwargs)``; when :attr:`packing` is on, the prompt's KV
        cache is computed padding-free first (:func:`pstar_plugins.core.packing.prefill`)."""
        from pstar_plugins.core import packing

        return packing.generate(model, inputs, self.packing, while_packed, **kwargs)

    # -- running -------------------------------------------------------------------
    def run(self, base_model: nn.Module, inputs: dict[str, Any], task_ids: torch.Tensor | None):
        raise NotImplementedError

    def generate(self, base_model: nn.Module, inputs: dict[str, Any], task_ids: torch.Tensor | None, **kwargs):
        raise NotImplementedError(f"{type(self).__name__} does not support generate().")

    def detach(self, base_model: nn.Module) -> None:
        """Undo what construction injected into ``base_model``."""

    def checkpoint_context(self):
        """``context_fn`` for non-reentrant gradient checkpointing: (forward, recompute) contexts."""
        return contextlib.nullcontext(), contextlib.nullcontext()

    # -- tasks -----------------------------------------------------------------------
    @classmethod
    def check_tokenizer(cls, config: MethodConfig, tokenizer) -> None:
        """Refuse ``config`` for what ``tokenizer`` alone shows it cannot do (P-tuning v2: label
        words that tokenise to nothing or start alike), so that ``pstar train`` says so before the
        model loads; for ``--init-from-adapter`` it gets ``config.for_loading()``, the config the
        adapter is built with. Construction must still check the same (``build_model`` from
        Python never calls this). Default: nothing to check."""

    def check_task_ids(self, task_ids: torch.Tensor | None, batch: int) -> torch.Tensor | None:
        """Validate per-row task ids; ``None`` means the single prompt for every row."""
        if task_ids is None:
            if self.config.num_tasks > 1:
                raise ConfigError(
                    f"this adapter holds {self.config.num_tasks} task prompts; pass task_ids (one index per row)."
                )
            return None
        task_ids = torch.as_tensor(task_ids).long().reshape(-1)
        if task_ids.numel() != batch:
            raise ConfigError(f"task_ids has {task_ids.numel()} entries for a batch of {batch}; expected one per row.")
        if task_ids.numel() and (task_ids.min() < 0 or task_ids.max() >= self.config.num_tasks):
            raise ConfigError(
                f"task_ids must lie in [0, {self.config.num_tasks}), got {task_ids.tolist()}."
            )
        return task_ids

    # -- training ------------------------------------------------------------------
    def trainable_parameter_names(self) -> list[str]:
        """Names (relative to this module) of the parameters to train: by default all of them."""
        return [name for name, _ in self.named_parameters()]

    def param_groups(self, learning_rate: float, weight_decay: float) -> list[dict[str, Any]]:
        params = [p for p in self.parameters() if p.requires_grad]
        return [{"name": "prompt", "params": params, "lr": learning_rate, "weight_decay": weight_decay}]

    def trainable_state(self) -> dict[str, torch.Tensor]:
        return {k: v.detach() for k, v in self.state_dict().items()}

    def load_trainable_state(self, state: Mapping[str, torch.Tensor]) -> None:
        own = self.state_dict()
        missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
        if missing or unexpected:
            raise AdapterError(
                f"adapter tensors do not match the {type(self).__name__} built from its config: missing "
                f"{missing}, unexpected {unexpected}. The adapter was saved by another method or version."
            )
        for name, tensor in state.items():
            if tuple(tensor.shape) != tuple(own[name].shape):
                raise AdapterError(
                    f"adapter tensor {name!r} has shape {tuple(tensor.shape)}, the model expects "
                    f"{tuple(own[name].shape)}; the adapter was trained for a different model or config."
                )
        self.load_state_dict({k: v.to(own[k].dtype) for k, v in state.items()}, strict=True)

    # -- adapter files and export --------------------------------------------------------
    def adapter_geometry(self) -> dict[str, Any]:
        """The attention sites this method attaches to, recorded in the adapter file and checked
        when it is loaded (``{"self": {"layers": ..., ...}}``; see ``core.geometry``). Default:
        none (a method that only touches the embeddings)."""
        return {}

    def peft_export(self, base_model: nn.Module) -> PeftPrompt:
        """The adapter in PEFT's layout (called on a folded model with one task). Raise
        :class:`AdapterError` naming the reason when this method or config has no PEFT equivalent."""
        raise AdapterError(f"{type(self).__name__} has no PEFT equivalent; export the pstar adapter itself.")

    @classmethod
    def peft_options(cls, peft_config: Mapping[str, Any]) -> dict[str, Any]:
        """Config options that build this method for a PEFT adapter (``adapter_config.json``) of a
        type listed in the spec's ``peft_types``; :meth:`state_from_peft` then gives its tensors."""
        raise AdapterError(f"{cls.__name__} cannot be built from a PEFT adapter.")

    def state_from_peft(self, base_model: nn.Module, embeddings: torch.Tensor) -> dict[str, torch.Tensor]:
        """The :meth:`trainable_state` that PEFT's ``prompt_embeddings`` tensor stands for (the
        inverse of :meth:`peft_export`), for a module built with :meth:`peft_options`."""
        raise AdapterError(f"{type(self).__name__} cannot load a PEFT adapter.")

    @property
    def folded(self) -> bool:
        """Whether no training-only reparameterisation is left (``True`` for a method that has none)."""
        return True

    def fold(self) -> None:
        """Replace training-only reparameterisation by static tensors (default: nothing to fold)."""

"""The method contract: :class:`PromptMethod`, the one class a method author implements, with
its spec and config (the torch-free parts live in :mod:`pstar_plugins.contract.spec` and are
re-exported here). ``docs/method_contract.md`` documents every member: when the core calls it
and what it may assume.

A third-party method subclasses :class:`MethodConfig` and :class:`PromptMethod` and registers a
:class:`MethodSpec` naming both, exactly like the built-ins do.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any, ClassVar, Mapping

import torch
from torch import nn

from pstar_plugins.contract.errors import AdapterError, ConfigError, UnsupportedError

# with the spec's names re-exported (``X as X``): a method's module imports everything it needs from here
from pstar_plugins.contract.spec import DEFAULT_PRESET as DEFAULT_PRESET
from pstar_plugins.contract.spec import MethodConfig
from pstar_plugins.contract.spec import MethodPlugin as MethodPlugin
from pstar_plugins.contract.spec import MethodSpec as MethodSpec
from pstar_plugins.contract.spec import Preset as Preset
from pstar_plugins.contract.spec import one_of as one_of
from pstar_plugins.contract.spec import positive_int as positive_int

# ----------------------------------------------------------------------------- module

#: where a method keeps the continuation it runs after its call of the frozen model
#: (:meth:`pstar_plugins.contract.capabilities.OnePassContinuations.continuing`)
CONTINUATION = "_pstar_continuation"


@dataclass
class PeftPrompt:
    """What a method exports to PEFT's prompt-learning layout (``PeftExport.peft_export``).

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

    **Must**: ``__init__(config, base_model, tokenizer=None)`` (the spec builds it so), :meth:`run`
    (``PStarModel.forward``), and honour :attr:`contributing`. **May override** (each has a
    default): :meth:`generate`, :meth:`detach`, :meth:`trainable_parameter_names`,
    :meth:`param_groups`, :meth:`trainable_state` / :meth:`load_trainable_state`,
    :meth:`adapter_geometry`, :meth:`fold` / :attr:`folded`, :attr:`input_pads` /
    :attr:`slot_input` / :meth:`example_inputs`. **May call**: :meth:`disabled`,
    :attr:`contributing`, :meth:`check_task_ids`, and the frozen model through
    :mod:`pstar_plugins.mechanisms.base_calls`. **Opt-in** capabilities are the mixins of
    :mod:`pstar_plugins.contract.capabilities`. Every tensor this module owns is trainable and kept
    in fp32 (master weights), whatever the base model's dtype. docs/method_contract.md.
    """

    config: MethodConfig
    #: run the frozen model padding-free where possible (``mechanisms.packing``); set by ``PStarModel.packing``
    packing: bool = False
    #: inputs this method reads besides the frozen model's (e.g. P-tuning's template slots), each
    #: with the value that pads it: ``PStarModel.forward`` passes them through, collators pad them
    #: and scoring extends them over appended tokens, without naming them
    input_pads: ClassVar[Mapping[str, int]] = {}
    #: which of :attr:`input_pads` carries a template's ``{soft}`` slot numbers (tasks fill it from
    #: the template's encoding); ``None``: the method reads no template slots
    slot_input: ClassVar[str | None] = None

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
        """Values of :attr:`input_pads` for a batch of token ids (``(B, L)``, real tokens where
        ``attention_mask`` is 1). The conformance suite builds its batches with it; default: none."""
        return {}

    # -- running -------------------------------------------------------------------
    def run(self, base_model: nn.Module, inputs: dict[str, Any], task_ids: torch.Tensor | None):
        raise NotImplementedError

    def generate(self, base_model: nn.Module, inputs: dict[str, Any], task_ids: torch.Tensor | None, **kwargs):
        raise UnsupportedError(
            f"{type(self).__name__} does not support generate(); score with a forward call, or use "
            "a method that generates (pstar methods --verbose)."
        )

    def detach(self, base_model: nn.Module) -> None:
        """Undo what construction injected into ``base_model``."""

    # -- tasks -----------------------------------------------------------------------
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
            raise ConfigError(f"task_ids must lie in [0, {self.config.num_tasks}), got {task_ids.tolist()}.")
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
        when it is loaded (``{"self": {"layers": ..., ...}}``; see ``mechanisms.geometry``). Default:
        none (a method that only touches the embeddings)."""
        return {}

    @property
    def folded(self) -> bool:
        """Whether no training-only reparameterisation is left (``True`` for a method that has none)."""
        return True

    def fold(self) -> None:
        """Replace training-only reparameterisation by static tensors (default: nothing to fold)."""

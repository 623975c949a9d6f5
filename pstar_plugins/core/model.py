"""``PStarModel``: a frozen Hugging Face model plus one method's trainable module."""

from __future__ import annotations

from typing import Any, Mapping

import torch
from torch import nn

from pstar_plugins.errors import AdapterError, PluginError
from pstar_plugins.methods.base import MethodConfig, PromptMethod


#: attribute of a base model that carries a method (set by ``build_model``, removed by ``unwrap``)
CARRIED_METHOD = "_pstar_method"
#: adapter tensors with this prefix are base-model weights a plugin made trainable
EXTRA_PREFIX = "base_model."


class PStarModel(nn.Module):
    """The wrapped model. ``forward`` and ``generate`` take the base model's arguments plus
    ``task_ids`` (``(B,)``, the prompt each row uses in a mixed-task batch) and whatever inputs
    the method documents (e.g. ``prompt_index`` for p-tuning templates).

    Only ``method.*`` parameters are trainable; ``base_model`` stays frozen.
    """

    def __init__(self, base_model: nn.Module, method: PromptMethod, method_name: str, plugin_manager) -> None:
        super().__init__()
        self.base_model = base_model
        self.method = method
        self.method_name = method_name
        self._pm = plugin_manager

    @property
    def method_config(self) -> MethodConfig:
        return self.method.config

    @property
    def config(self):
        return self.base_model.config

    @property
    def packing(self) -> bool:
        """Whether calls run padding-free where they can (``core.packing``): the frozen model
        computes only real positions. Outputs at real positions are unchanged; positions that
        are padding get zeros instead of the padded call's values. Off by default."""
        return self.method.packing

    @packing.setter
    def packing(self, value: bool) -> None:
        self.method.packing = bool(value)

    @property
    def device(self) -> torch.device:
        return next(self.base_model.parameters()).device

    def forward(self, input_ids=None, attention_mask=None, task_ids=None, **kwargs):
        inputs: dict[str, Any] = {"input_ids": input_ids, "attention_mask": attention_mask, **kwargs}
        return self.method.run(self.base_model, inputs, task_ids)

    @torch.no_grad()
    def generate(self, input_ids=None, attention_mask=None, task_ids=None, **kwargs):
        """Generate like ``base_model.generate``; the output starts with ``input_ids`` for decoder-only models."""
        inputs: dict[str, Any] = {"input_ids": input_ids, "attention_mask": attention_mask}
        return self.method.generate(self.base_model, inputs, task_ids, **kwargs)

    # -- training conveniences ---------------------------------------------------------
    def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs: dict | None = None) -> None:
        """Checkpoint the frozen model's layers.

        Non-reentrant checkpointing is forced: prefixes reach attention through a closure, not a
        layer input, and reentrant checkpointing gives no gradient to such tensors.
        """
        kwargs = dict(gradient_checkpointing_kwargs or {})
        kwargs["use_reentrant"] = False
        # recomputation runs during backward, outside forward's scope: let the method restore
        # whatever state its layers read (e.g. the active prefixes) for the recomputed layer
        kwargs["context_fn"] = self.method.checkpoint_context
        self.base_model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
        self.base_model.train(self.training)

    def trainable_named_parameters(self) -> list[tuple[str, nn.Parameter]]:
        return [(n, p) for n, p in self.named_parameters() if p.requires_grad]

    def parameter_counts(self) -> tuple[int, int]:
        """(trainable, frozen) element counts; ZeRO-3 partitions report ``ds_numel``."""
        trainable = frozen = 0
        for p in self.parameters():
            n = getattr(p, "ds_numel", None) or p.numel()
            if p.requires_grad:
                trainable += n
            else:
                frozen += n
        return trainable, frozen

    # -- adapter state -------------------------------------------------------------------
    def trainable_state(self) -> dict[str, torch.Tensor]:
        """The adapter tensors as full CPU tensors. Under ZeRO-3 every rank must call this:
        only the method's partitions are gathered, never a frozen weight."""
        from pstar_plugins.core.distributed import gathered_trainable_state

        return gathered_trainable_state(self)

    def load_trainable_state(self, state: Mapping[str, torch.Tensor]) -> None:
        """Load adapter tensors in place (under ZeRO-3: on every rank, broadcast from rank 0)."""
        from pstar_plugins.core.distributed import load_trainable_state_gathered

        load_trainable_state_gathered(self, state)

    def extra_trainable_parameters(self) -> list[tuple[str, nn.Parameter]]:
        """Trainable parameters outside the method's module: base-model weights that a plugin
        unfroze through ``pstar_trainable_parameters`` (a final norm, a bias, ...). They are part
        of the adapter: saved under their ``named_parameters()`` name and loaded back."""
        return [(n, p) for n, p in self.named_parameters() if p.requires_grad and not n.startswith("method.")]

    def raw_trainable_state(self) -> dict[str, torch.Tensor]:
        state = self._pm.hook.pstar_trainable_state(model=self)
        if state is None:
            raise PluginError(f"no plugin returned the trainable state of method {self.method_name!r}.")
        state = dict(state)
        for name, param in self.extra_trainable_parameters():
            if name in state:
                raise PluginError(f"method {self.method_name!r} saves a tensor named {name!r}, the name of a base-model weight.")
            state[name] = param.detach()
        return state

    def raw_load_trainable_state(self, state: Mapping[str, torch.Tensor]) -> None:
        own = dict(self.named_parameters())
        extra = {k: v for k, v in state.items() if k.startswith(EXTRA_PREFIX)}
        unknown = sorted(k for k in extra if k not in own)
        if unknown:
            raise AdapterError(f"the adapter holds base-model weights {unknown[:5]} that this model does not have; "
                               "it was trained on another architecture.")
        for name, tensor in extra.items():
            if tuple(tensor.shape) != tuple(getattr(own[name], "ds_shape", own[name].shape)):
                raise AdapterError(f"adapter tensor {name!r} has shape {tuple(tensor.shape)}, the model's weight "
                                   f"{tuple(own[name].shape)}; the adapter was trained for a different model.")
        method_state = {k: v for k, v in state.items() if k not in extra}
        if self._pm.hook.pstar_load_trainable_state(model=self, state=method_state) is None:
            raise PluginError(f"no plugin loaded the trainable state of method {self.method_name!r}.")
        with torch.no_grad():
            for name, tensor in extra.items():
                own[name].copy_(tensor.to(own[name].dtype))

    def fold(self) -> "PStarModel":
        """Fold reparameterisation (prefix MLP, prompt encoder) into static tensors, in place."""
        if self._pm.hook.pstar_fold(model=self) is None:
            raise PluginError(f"no plugin folds method {self.method_name!r}.")
        return self

    def save_adapter(self, directory, **kwargs) -> None:
        from pstar_plugins.core.adapter_io import save_adapter

        save_adapter(self, directory, **kwargs)

    def disable_adapter(self):
        """Context manager: run the bare base model through this wrapper (the method's prompt
        switched off), e.g. for a zero-shot baseline or a reference output."""
        return self.method.disabled()

    def unwrap(self) -> nn.Module:
        """Remove the method from the base model and return the base model as it was loaded."""
        self.method.detach(self.base_model)
        self.base_model.__dict__.pop(CARRIED_METHOD, None)
        return self.base_model

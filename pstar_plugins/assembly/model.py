"""``PStarModel``: a frozen Hugging Face model plus one method's trainable module."""

from __future__ import annotations

import inspect
import types
from collections import OrderedDict
from typing import Any, Mapping

import torch
from torch import nn

from pstar_plugins.assembly.registry import plugin_record
from pstar_plugins.contract.capabilities import CheckpointContext
from pstar_plugins.contract.errors import AdapterError, PluginError
from pstar_plugins.contract.method import MethodConfig, PromptMethod
from pstar_plugins.mechanisms.adapter_io import adapter_metadata, write_adapter
from pstar_plugins.mechanisms.fast_paths import FastPaths
from pstar_plugins.mechanisms.fast_paths import of as fast_paths_of
from pstar_plugins.mechanisms.template import bind_slots

#: attribute of a base model that carries a method (set by ``build_model``, removed by ``unwrap``)
CARRIED_METHOD = "_pstar_method"
#: adapter tensors with this prefix are base-model weights a plugin made trainable
EXTRA_PREFIX = "base_model."


def _frozen_keys_are_not_missing(model: "PStarModel", incompatible) -> None:
    """Load post-hook: drop the frozen base-model weights from the missing keys (in place, as
    ``register_load_state_dict_post_hook`` allows); missing adapter tensors stay reported. Keys
    carry whatever prefix a wrapper adds (``module.base_model....``)."""
    adapter = {k.removeprefix("base_model.") for k in model.state_dict() if k.startswith("base_model.")}
    kept = []
    for key in incompatible.missing_keys:
        at = key.find("base_model.")
        if at < 0 or key[at + len("base_model.") :] in adapter:
            kept.append(key)
    incompatible.missing_keys[:] = kept


class PStarModel(nn.Module):
    """The wrapped model. ``forward`` and ``generate`` take the base model's arguments plus
    ``task_ids`` (``(B,)``, the prompt each row uses in a mixed-task batch) and whatever inputs
    the method's own (``PromptMethod.input_pads``), passed through to it unnamed.

    Only ``method.*`` parameters are trainable; ``base_model`` stays frozen.
    """

    def __init__(self, base_model: nn.Module, method: PromptMethod, method_name: str, plugin_manager) -> None:
        super().__init__()
        self.base_model = base_model
        self.method = method
        self.method_name = method_name
        self._registry = _Shared(plugin_manager)
        self.plugin_origin = plugin_record(plugin_manager, method_name)
        if method.input_pads:
            self.forward = types.MethodType(_forward_naming(tuple(method.input_pads)), self)
        # frozen weights are not part of this model's state (see state_dict): a strict load, also
        # through a wrapper such as DDP whose load recurses past this module, does not ask for them
        self.register_load_state_dict_post_hook(_frozen_keys_are_not_missing)

    @property
    def plugin_manager(self):
        """The registry the method came from: build asks its hooks for trainable parameters and
        optimizer groups; adapter files record the plugin that registered the method."""
        return self._registry.value

    @property
    def fast_paths(self) -> FastPaths:
        """Which fast paths (packing, packed prefill, prompt cache, one-pass scoring) this model
        takes and why not, decided once (:mod:`pstar_plugins.mechanisms.fast_paths`)."""
        return fast_paths_of(self.base_model, self.method)

    @property
    def method_config(self) -> MethodConfig:
        return self.method.config

    @property
    def config(self):
        return self.base_model.config

    @property
    def generation_config(self):
        """The base model's (trainers such as TRL's set its pad and EOS tokens)."""
        return self.base_model.generation_config

    def add_model_tags(self, tags) -> None:
        """Tag the base model's card (``PreTrainedModel.add_model_tags``; TRL calls it)."""
        self.base_model.add_model_tags(tags)

    @property
    def packing(self) -> bool:
        """Whether calls run padding-free where they can (``mechanisms.packing``): the frozen model
        computes only real positions. Outputs at real positions are unchanged; positions that
        are padding get zeros instead of the padded call's values. Off by default."""
        return self.method.packing

    @packing.setter
    def packing(self, value: bool) -> None:
        self.method.packing = bool(value)

    @property
    def device(self) -> torch.device:
        return next(self.base_model.parameters()).device

    #: the method's loss is a mean over the batch it is given; ``transformers.Trainer`` then
    #: scales it for gradient accumulation itself instead of passing ``num_items_in_batch``
    accepts_loss_kwargs = False

    def forward(
        self,
        input_ids=None,
        attention_mask=None,
        labels=None,
        task_ids=None,
        position_ids=None,
        token_type_ids=None,
        inputs_embeds=None,
        decoder_input_ids=None,
        decoder_attention_mask=None,
        **kwargs,
    ):
        """The base model's forward plus ``task_ids`` and the method's own inputs (in ``kwargs``).

        The arguments are named, not hidden in ``**kwargs``: ``transformers.Trainer`` keeps only the
        dataset columns the signature names and finds the labels there (without ``labels`` in the
        signature it drops them and no loss comes back). Arguments left ``None`` are not passed on.
        """
        named = {
            "labels": labels,
            "position_ids": position_ids,
            "token_type_ids": token_type_ids,
            "inputs_embeds": inputs_embeds,
            "decoder_input_ids": decoder_input_ids,
            "decoder_attention_mask": decoder_attention_mask,
        }
        inputs: dict[str, Any] = {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            **{k: v for k, v in named.items() if v is not None},
            **kwargs,
        }
        # a batch the tasks built carries a template's slots under their own key: the method says where they go
        return self.method.run(self.base_model, bind_slots(inputs, self.method.slot_input), task_ids)

    @torch.no_grad()
    def generate(self, input_ids=None, attention_mask=None, task_ids=None, **kwargs):
        """Generate like ``base_model.generate``; the output starts with ``input_ids`` for decoder-only models."""
        from pstar_plugins.mechanisms.distributed import gathered

        inputs: dict[str, Any] = {"input_ids": input_ids, "attention_mask": attention_mask}
        kwargs = bind_slots(kwargs, self.method.slot_input)
        # generate() runs outside a DeepSpeed engine's forward, where ZeRO-3 fetches only the
        # frozen modules' own weights: the method's partitions are gathered for the call (a
        # collective: under ZeRO-3 every rank generates); a no-op on ordinary tensors
        with gathered([*self.method.parameters(), *(p for _, p in self.extra_trainable_parameters())]):
            return self.method.generate(self.base_model, inputs, task_ids, **kwargs)

    # -- training conveniences ---------------------------------------------------------
    def activation_checkpointing_enable(self, activation_checkpointing_kwargs: dict | None = None, **options) -> None:
        """Checkpoint the frozen model's layers (``options``, e.g. ``every_n_layers`` or ``offload``,
        go to the base model's method, as ``Trainer`` passes them).

        Non-reentrant checkpointing is forced: prefixes reach attention through a closure, not a
        layer input, and reentrant checkpointing gives no gradient to such tensors.
        """
        kwargs = dict(activation_checkpointing_kwargs or {})
        kwargs["use_reentrant"] = False
        # recomputation runs during backward, outside forward's scope: let the method restore
        # whatever state its layers read (e.g. the active prefixes) for the recomputed layer
        if isinstance(self.method, CheckpointContext):
            kwargs["context_fn"] = self.method.checkpoint_context
        enable = getattr(self.base_model, "activation_checkpointing_enable", None)
        if enable is not None:
            enable(activation_checkpointing_kwargs=kwargs, **options)
        else:  # transformers before the rename (the name pyproject.toml's range still admits)
            self.base_model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs, **options)
        self.base_model.train(self.training)

    def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs: dict | None = None, **options) -> None:
        """The name ``Trainer`` calls before transformers 5.25; same as :meth:`activation_checkpointing_enable`."""
        self.activation_checkpointing_enable(gradient_checkpointing_kwargs, **options)

    @property
    def is_activation_checkpointing(self) -> bool:
        """Whether the frozen model's layers are checkpointed (``Trainer`` reads it under DDP)."""
        if hasattr(type(self.base_model), "is_activation_checkpointing"):
            return self.base_model.is_activation_checkpointing
        return self.base_model.is_gradient_checkpointing  # transformers before the rename

    def trainable_named_parameters(self) -> list[tuple[str, nn.Parameter]]:
        return [(n, p) for n, p in self.named_parameters() if p.requires_grad]

    def parameter_counts(self) -> tuple[int, int]:
        """(trainable, frozen) element counts; ZeRO-3 partitions report ``ds_numel``."""
        trainable = frozen = 0
        for p in self.parameters():
            # ZeRO-3 partitions and bitsandbytes' packed 4-bit weights keep their real shape aside
            quant = getattr(p, "quant_state", None)
            n = getattr(p, "ds_numel", None) or (quant.shape.numel() if quant is not None else p.numel())
            if p.requires_grad:
                trainable += n
            else:
                frozen += n
        return trainable, frozen

    # -- adapter state -------------------------------------------------------------------
    def state_dict(self, *args, destination=None, prefix: str = "", keep_vars: bool = False):
        """The adapter's tensors only: the method's module (``method.*``) and base-model weights a
        plugin unfroze, under their module paths. No frozen weight is ever part of this model's state;
        ``load_state_dict`` takes this back strictly without asking for frozen weights (a full state
        dict, as older checkpoints hold, loads too: its frozen weights are copied like any module's).

        Every generic saver calls this: ``transformers.Trainer`` (which saves ``state_dict()`` for
        any model that is not a ``PreTrainedModel``), ``accelerator.save_state``, DDP (whose own
        ``state_dict`` recurses into this one) and DeepSpeed's module save. A checkpoint is then
        the adapter plus the optimizer, scheduler and RNG states at any model size, with no
        subclass or flag. ``base_model.state_dict()`` is the frozen model's, for whoever wants it.
        """
        if args:  # torch's deprecated positional form: (destination, prefix, keep_vars)
            destination, prefix, keep_vars = (list(args) + [destination, prefix, keep_vars][len(args) :])[:3]
        out = destination if destination is not None else OrderedDict()
        self.method.state_dict(destination=out, prefix=prefix + "method.", keep_vars=keep_vars)
        for name, param in self.extra_trainable_parameters():
            out[prefix + name] = param if keep_vars else param.detach()
        return out

    def trainable_state(self) -> dict[str, torch.Tensor]:
        """The adapter tensors as full CPU tensors. Under ZeRO-3 every rank must call this:
        only the method's partitions are gathered, never a frozen weight."""
        from pstar_plugins.mechanisms.distributed import gathered_state

        params = [*self.method.parameters(), *(p for _, p in self.extra_trainable_parameters())]
        return gathered_state(params, self.raw_trainable_state)

    def load_trainable_state(self, state: Mapping[str, torch.Tensor]) -> None:
        """Load adapter tensors in place (under ZeRO-3: on every rank, broadcast from rank 0)."""
        from pstar_plugins.mechanisms.distributed import load_state_gathered

        own = dict(self.named_parameters())
        params = [*self.method.parameters(), *(p for n, p in own.items() if n in state and not n.startswith("method."))]
        own.update({f"method.{k}": v for k, v in self.method.state_dict(keep_vars=True).items()})
        # method tensors are saved without their "method." prefix, base-model weights with their full name
        targets = {k: own.get(f"method.{k}", own.get(k)) for k in state}
        load_state_gathered(params, targets, dict(state), self.raw_load_trainable_state)

    def extra_trainable_parameters(self) -> list[tuple[str, nn.Parameter]]:
        """Trainable parameters outside the method's module: base-model weights that a plugin
        unfroze through ``pstar_trainable_parameters`` (a final norm, a bias, ...). They are part
        of the adapter: saved under their ``named_parameters()`` name and loaded back."""
        return [(n, p) for n, p in self.named_parameters() if p.requires_grad and not n.startswith("method.")]

    def raw_trainable_state(self) -> dict[str, torch.Tensor]:
        state = dict(self.method.trainable_state())
        for name, param in self.extra_trainable_parameters():
            if name in state:
                raise PluginError(
                    f"method {self.method_name!r} saves a tensor named {name!r}, the name of a base-model weight."
                )
            state[name] = param.detach()
        return state

    def raw_load_trainable_state(self, state: Mapping[str, torch.Tensor]) -> None:
        own = dict(self.named_parameters())
        extra = {k: v for k, v in state.items() if k.startswith(EXTRA_PREFIX)}
        unknown = sorted(k for k in extra if k not in own)
        if unknown:
            raise AdapterError(
                f"the adapter holds base-model weights {unknown[:5]} that this model does not have; "
                "it was trained on another architecture."
            )
        for name, tensor in extra.items():
            if tuple(tensor.shape) != tuple(getattr(own[name], "ds_shape", own[name].shape)):
                raise AdapterError(
                    f"adapter tensor {name!r} has shape {tuple(tensor.shape)}, the model's weight "
                    f"{tuple(own[name].shape)}; the adapter was trained for a different model."
                )
        method_state = {k: v for k, v in state.items() if k not in extra}
        self.method.load_trainable_state(method_state)
        with torch.no_grad():
            for name, tensor in extra.items():
                own[name].copy_(tensor.to(own[name].dtype))

    def fold(self) -> "PStarModel":
        """Fold reparameterisation (prefix MLP, prompt encoder) into static tensors, in place."""
        self.method.fold()
        return self

    def adapter_metadata(self, task: dict[str, Any] | None = None) -> dict[str, Any]:
        """The config an adapter of this model records
        (:func:`~pstar_plugins.mechanisms.adapter_io.adapter_metadata`)."""
        return adapter_metadata(
            self.method_name,
            self.method_config.to_dict(),
            self.method.folded,
            self.base_model.config,
            self.method.adapter_geometry(),
            plugin=self.plugin_origin,
            task=task,
        )

    def save_adapter(
        self,
        directory,
        state: Mapping[str, torch.Tensor] | None = None,
        write: bool = True,
        task: dict[str, Any] | None = None,
    ) -> None:
        """Write the adapter (``adapter_config.json`` + ``adapter.safetensors``) into ``directory``.

        ``state`` may be passed when it was gathered elsewhere (ZeRO-3); ``write=False`` lets
        non-main ranks take part in gathering without touching the disk. ``task`` records what
        the adapter was trained for (kind, template, label words or target column), so
        evaluating it later needs no flags repeated.
        """
        state = dict(state) if state is not None else self.trainable_state()
        if write:
            write_adapter(directory, self.adapter_metadata(task), state)

    def disable_adapter(self):
        """Context manager: run the bare base model through this wrapper (the method's prompt
        switched off), e.g. for a zero-shot baseline or a reference output."""
        return self.method.disabled()

    def save_pretrained(
        self,
        save_directory,
        state_dict: Mapping[str, torch.Tensor] | None = None,
        is_main_process: bool = True,
        task: dict[str, Any] | None = None,
        **kwargs,
    ) -> None:
        """Write the adapter files (``adapter_config.json``, ``adapter.safetensors``), never a frozen
        weight: the ``save_pretrained`` of ``transformers`` and PEFT, in this library's format
        (``pstar_plugins.load_adapter(base_model, directory, trainable=False)`` loads them back).

        ``state_dict``: the adapter tensors (:meth:`trainable_state`) if already gathered; under
        ZeRO-3 every rank calls this and only ``is_main_process`` writes. Other keyword
        arguments of ``PreTrainedModel.save_pretrained`` (``safe_serialization``, ...) are
        accepted and have no effect: the format is always safetensors.
        """
        state = dict(state_dict) if state_dict is not None else self.trainable_state()
        expected = set(self.raw_trainable_state())
        if set(state) != expected:
            raise PluginError(
                f"save_pretrained got tensors {sorted(set(state) ^ expected)[:5]} that are not (or not all of) "
                f"the adapter's; pass model.trainable_state() or no state_dict."
            )
        self.save_adapter(save_directory, state=state, write=is_main_process, task=task)

    def unwrap(self) -> nn.Module:
        """Remove the method from the base model and return the base model as it was loaded."""
        self.method.detach(self.base_model)
        self.base_model.__dict__.pop(CARRIED_METHOD, None)
        return self.base_model


def _forward_naming(names: tuple[str, ...]):
    """``PStarModel.forward`` whose signature also names the method's own inputs: ``transformers.Trainer``
    keeps only the dataset columns ``forward``'s signature names, so a plain ``Trainer`` keeps them
    too. A function of its own (not a closure over the model), bound per model: a deep copy of the
    model rebinds it to the copy."""
    function = types.FunctionType(
        PStarModel.forward.__code__,
        PStarModel.forward.__globals__,
        "forward",
        PStarModel.forward.__defaults__,
        PStarModel.forward.__closure__,
    )
    function.__kwdefaults__ = PStarModel.forward.__kwdefaults__
    function.__doc__ = PStarModel.forward.__doc__
    signature = inspect.signature(PStarModel.forward)
    *named, rest = signature.parameters.values()
    own = [inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=None) for name in names]
    function.__signature__ = signature.replace(parameters=[*named, *own, rest])
    return function


class _Shared:
    """A value every copy of a model shares (the plugin registry): ``copy.deepcopy`` of a model,
    as TRL does for a reference model, keeps it instead of copying modules and hooks."""

    def __init__(self, value) -> None:
        self.value = value

    def __deepcopy__(self, memo) -> "_Shared":
        return self


def slot_input_of(model) -> str | None:
    """The input that ``model``'s method reads a template's soft slots from (``None``: a bare model,
    or a method that reads none), through wrappers such as DDP or DeepSpeed's engine."""
    while not isinstance(model, PStarModel) and getattr(model, "module", None) is not None:
        model = model.module
    return model.method.slot_input if isinstance(model, PStarModel) else None

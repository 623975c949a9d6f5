"""Train a ``PStarModel`` with ``transformers.Trainer``: adapter-only checkpoints, resume and
``load_best_model_at_end``, a collator that pads the methods' extra inputs.

A ``PStarModel`` trains in a plain ``Trainer`` with default ``TrainingArguments`` (its forward
names ``labels``, ``task_ids`` and a method's own inputs, ``PromptMethod.input_pads``, so the
columns are kept; pass ``PStarDataCollator(tokenizer, input_pads=model.method.input_pads)``).
``Trainer`` saves ``state_dict()`` for a model that is not a ``PreTrainedModel``, which for a
``PStarModel`` is the adapter's tensors, without their config. :class:`PStarTrainer` keeps
everything else of ``Trainer`` and writes and reloads adapter folders instead (under DeepSpeed
too, without the engine's frozen fragments)::

    trainer = PStarTrainer(model=build_model(base, "prompt-tuning", num_virtual_tokens=20),
                           args=TrainingArguments("runs/x"), train_dataset=features,
                           data_collator=PStarDataCollator(tokenizer))
    trainer.train()             # checkpoint-N/ holds adapter.safetensors, optimizer.pt, ...
    trainer.save_model("final") # adapter_config.json + adapter.safetensors

For TRL's ``SFTTrainer`` see :mod:`pstar_plugins.trl_sft`.
"""

from __future__ import annotations

import functools
import inspect
import os
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import torch
from transformers import Trainer

from pstar_plugins.contract.errors import AdapterError, ConfigError
from pstar_plugins.mechanisms.inputs import IGNORE_INDEX

TRAINING_ARGS_NAME = "training_args.bin"  # what Trainer writes beside a saved model

#: pad value of each sequence input of the frozen models; ``input_ids`` uses the pad token, and a
#: method's own inputs the values it declares (``PromptMethod.input_pads``)
PAD_VALUES = {
    "attention_mask": 0,
    "labels": IGNORE_INDEX,
    "token_type_ids": 0,
    "position_ids": 0,
    "decoder_attention_mask": 0,
}


def encode_example(
    template,
    tokenizer,
    example: Mapping[str, Any],
    target: str,
    max_length: int | None = None,
    task_id: int | None = None,
    slot_input: str | None = None,
) -> dict[str, list[int] | int]:
    """One training feature for a causal LM: ``template`` filled from ``example`` up to its
    ``{answer}`` slot, followed by ``target`` (a label word or a reference text) and EOS, with
    ``labels`` on the target tokens only. A template with ``{soft}`` slots marks them in the input
    the method reads them from: pass ``slot_input=model.method.slot_input``.

    The prompt and target are tokenised exactly as ``pstar_plugins.train --task generation``
    does. ``max_length`` keeps the end of the prompt and at least one target token.
    """
    from pstar_plugins.mechanisms.template import SLOT_PAD, Template
    from pstar_plugins.tasks import generation

    if isinstance(template, str):
        template = Template.parse(template)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    ids, index = generation._prompt(template, tokenizer, dict(example), pad)
    target_ids = generation._target_ids(tokenizer, str(target))
    if max_length is not None:
        if len(ids) >= max_length:
            ids, index = ids[len(ids) - max_length + 1 :], index[len(index) - max_length + 1 :]
        target_ids = target_ids[: max_length - len(ids)]
    feature: dict[str, list[int] | int] = {
        "input_ids": ids + target_ids,
        "attention_mask": [1] * (len(ids) + len(target_ids)),
        "labels": [IGNORE_INDEX] * len(ids) + target_ids,
    }
    if any(i != SLOT_PAD for i in index):
        if slot_input is None:
            raise ConfigError(
                f"the template {template.text!r} has {{soft}} slots: pass slot_input=model.method.slot_input "
                "(the input the method reads them from)."
            )
        feature[slot_input] = index + [SLOT_PAD] * len(target_ids)
    if task_id is not None:
        feature["task_ids"] = int(task_id)
    return feature


@dataclass
class PStarDataCollator:
    """Pad a list of features into a batch: ``input_ids`` with the pad token, ``labels`` with
    -100, masks with 0, a method's own inputs with the values it declares (``input_pads``;
    :class:`PStarTrainer` fills them in from its model); scalars such as ``task_ids`` become a
    ``(B,)`` tensor. ``padding_side`` defaults to the tokenizer's."""

    tokenizer: Any
    padding_side: str | None = None
    input_pads: Mapping[str, int] | None = None

    def __call__(self, features: Sequence[Mapping[str, Any]]) -> dict[str, torch.Tensor]:
        side = self.padding_side or getattr(self.tokenizer, "padding_side", "right")
        pad_id = self.tokenizer.pad_token_id
        if pad_id is None:
            pad_id = self.tokenizer.eos_token_id if self.tokenizer.eos_token_id is not None else 0
        names = list(features[0])
        for number, feature in enumerate(features, start=1):
            if sorted(feature) != sorted(names):
                raise ValueError(
                    f"feature {number} has columns {sorted(feature)}, feature 1 has {sorted(names)}; "
                    "every feature of a batch needs the same columns."
                )
        batch: dict[str, torch.Tensor] = {}
        for name in names:
            values = [f[name] for f in features]
            if isinstance(values[0], (int, float)) or (torch.is_tensor(values[0]) and values[0].dim() == 0):
                batch[name] = torch.as_tensor(values)
                continue
            rows = [torch.as_tensor(v) for v in values]
            width = max(len(r) for r in rows)
            pads = {**PAD_VALUES, **(self.input_pads or {})}
            if name not in pads and name not in ("input_ids", "decoder_input_ids"):
                raise ValueError(
                    f"feature column {name!r} has no known pad value; a method's own inputs are padded "
                    "with the values it declares: pass input_pads=model.method.input_pads."
                )
            fill = pad_id if name in ("input_ids", "decoder_input_ids") else pads[name]
            out = torch.full((len(rows), width), fill, dtype=rows[0].dtype)
            for i, r in enumerate(rows):
                if side == "left":
                    out[i, width - len(r) :] = r
                else:
                    out[i, : len(r)] = r
            batch[name] = out
        return batch


def deepspeed_without_gpu(backend: str = "gloo") -> dict[str, Any]:
    """``TrainingArguments(deepspeed=..., accelerator_config=deepspeed_without_gpu())`` for
    DeepSpeed on CPU processes (launched with ``DS_ACCELERATOR=cpu``).

    Without a GPU, ``TrainingArguments`` (transformers 5.24) lets DeepSpeed start the process
    group with no backend named: Accelerate then counts 1 process while DeepSpeed counts all, and
    DeepSpeed stops at its batch check ("train_batch_size is not equal to micro_batch_per_gpu *
    gradient_acc_step * world_size 2 != 2 * 1 * 2"). This sets the process state up first, with
    ``backend``, and has ``TrainingArguments`` use it. Call it before creating the arguments.
    """
    from accelerate import PartialState

    os.environ["ACCELERATE_USE_DEEPSPEED"] = "true"
    PartialState(backend=backend)
    return {"use_configured_state": True}


def _without_frozen_keys(load, *args, **kwargs):
    kwargs["load_module_strict"] = False  # the checkpoint has no frozen weights to match
    return load(*args, **kwargs)


class AdapterCheckpointMixin:
    """What :class:`PStarTrainer` changes in ``transformers.Trainer`` (and, mixed into TRL's
    ``SFTTrainer``, in :class:`pstar_plugins.trl_sft.PStarSFTTrainer`):

    * ``save_model`` (final saves and every checkpoint) writes the adapter files only, via
      :meth:`PStarModel.save_pretrained`; under ZeRO-3 only the method's partitions are gathered;
    * ``resume_from_checkpoint`` and ``load_best_model_at_end`` load the adapter tensors back
      (``Trainer`` restores the optimizer, scheduler and RNG states itself);
    * the optimizer gets the method's parameter groups (e.g. no weight decay on soft tokens);
    * dataset columns are kept when the base model's forward takes them.
    """

    def _pstar_model(self):
        from pstar_plugins.assembly.model import PStarModel

        model = self.accelerator.unwrap_model(self.model)
        if not isinstance(model, PStarModel):
            raise TypeError(
                f"{type(self).__name__} trains a PStarModel (pstar_plugins.build_model); got {type(model).__name__}."
            )
        return model

    def _set_signature_columns_if_needed(self) -> None:
        if self._signature_columns is None:
            model = self._pstar_model()
            columns = list(inspect.signature(model.forward).parameters)
            columns += [c for c in inspect.signature(model.base_model.forward).parameters if c not in columns]
            columns += [c for c in model.method.input_pads if c not in columns]  # the method's own inputs
            self._signature_columns = columns + list({"label", "label_ids", *self.label_names})

    def create_optimizer(self, model=None):
        if self.optimizer is None:
            from pstar_plugins.assembly.build import param_groups

            groups = param_groups(self._pstar_model(), self.args.learning_rate, self.args.weight_decay)
            for group in groups:
                group.pop("name", None)
            optimizer_cls, optimizer_kwargs = self.get_optimizer_cls_and_kwargs(self.args, self.model)
            self.optimizer = optimizer_cls(groups, **optimizer_kwargs)
        return self.optimizer

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        model = self._pstar_model()
        # every rank takes part: under ZeRO-3 gathering the adapter's partitions is a collective
        model.save_pretrained(output_dir, is_main_process=self.args.should_save)
        if not self.args.should_save:
            return
        if self.processing_class is not None:
            self.processing_class.save_pretrained(output_dir)
        torch.save(self.args, os.path.join(output_dir, TRAINING_ARGS_NAME))

    # DeepSpeed ZeRO-3: the engine checkpoint Trainer writes beside the adapter (for resuming)
    # would also hold every rank's shard of the frozen weights ("frozen_param_fragments");
    # Trainer leaves them out for PEFT models only. The engine is handed to Trainer through this
    # attribute, so it is set up here to save without them, and to load such a checkpoint
    # without asking for them (under ZeRO-3 the trainable partitions come back from the
    # optimizer states; the frozen weights are the ones the model was loaded with).
    @property
    def model_wrapped(self):
        return self.__dict__.get("_pstar_model_wrapped")

    @model_wrapped.setter
    def model_wrapped(self, value) -> None:
        stage = getattr(value, "zero_optimization_stage", None)
        if callable(stage) and stage() == 3 and "save_checkpoint" not in vars(value):
            value.save_checkpoint = functools.partial(value.save_checkpoint, exclude_frozen_parameters=True)
            value.load_checkpoint = functools.partial(_without_frozen_keys, value.load_checkpoint)
        self.__dict__["_pstar_model_wrapped"] = value

    def _load_adapter_tensors(self, directory) -> None:
        from pstar_plugins.mechanisms.adapter_io import read_adapter

        model = self._pstar_model()
        meta, tensors = read_adapter(directory)
        if meta["method"] != model.method_name:
            raise AdapterError(
                f"{directory} holds a {meta['method']!r} adapter, but the model being trained uses "
                f"{model.method_name!r}; resume from a checkpoint of this run."
            )
        if bool(meta["folded"]) != bool(model.method.folded):
            raise AdapterError(
                f"{directory} holds a {'folded' if meta['folded'] else 'unfolded'} adapter, the model is "
                f"{'folded' if model.method.folded else 'unfolded'}; resume from a checkpoint of this run."
            )
        model.load_trainable_state(tensors)

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        self._load_adapter_tensors(resume_from_checkpoint)

    def _load_best_model(self) -> None:
        if self.is_deepspeed_enabled:  # the engine's checkpoint holds the trainable partitions
            return super()._load_best_model()
        self._load_adapter_tensors(self.state.best_model_checkpoint)


class PStarTrainer(AdapterCheckpointMixin, Trainer):
    """``transformers.Trainer`` for a ``PStarModel``: see :class:`AdapterCheckpointMixin`."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        collator = self.data_collator
        if isinstance(collator, PStarDataCollator) and collator.input_pads is None:
            collator.input_pads = dict(self._pstar_model().method.input_pads)

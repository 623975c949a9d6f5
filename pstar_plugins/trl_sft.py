"""Train any P*-tuning method with TRL's ``SFTTrainer`` (``pip install 'pstar-plugins[trl]'``).

:class:`PStarSFTTrainer` is ``SFTTrainer`` with this library's adapter checkpoints
(:class:`pstar_plugins.hf_trainer.AdapterCheckpointMixin`): TRL prepares the data as usual
(chat or prompt/completion datasets; for prompt/completion data the loss covers the completion
tokens only, TRL's ``completion_only_loss`` default), and every checkpoint and ``save_model()``
holds the adapter files only::

    model = build_model(AutoModelForCausalLM.from_pretrained(path), "prefix-tuning", num_virtual_tokens=20)
    trainer = PStarSFTTrainer(model=model, args=SFTConfig("runs/sft"), train_dataset=chats,
                              processing_class=tokenizer)
    trainer.train()

Two things differ from ``SFTTrainer`` with a ``PreTrainedModel``:

* TRL swaps ``model.forward`` for a fused LM head that calls the backbone directly; that would
  bypass the method's prompts, so the wrapped model keeps its own forward and the loss is the
  model's cross-entropy over the label tokens (``Trainer.compute_loss``). TRL's extra logged
  metrics (``entropy``, ``mean_token_accuracy``) are therefore not logged.
* P-tuning reads its template slots (``PromptMethod.slot_input``); TRL's collator knows nothing
  of them, so the method's soft tokens (all ``{soft}`` slots of its template, in order) are put
  in front of each conversation.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import torch
from transformers import Trainer
from trl import SFTTrainer

from pstar_plugins.hf_trainer import AdapterCheckpointMixin
from pstar_plugins.mechanisms.inputs import IGNORE_INDEX
from pstar_plugins.mechanisms.template import SLOT_PAD


class SoftTokensInFront:
    """Wrap a collator: put ``count`` soft-token positions in front of every row (after any
    left padding) and mark them in the input ``slot_input`` (0..count-1; -1 elsewhere)."""

    def __init__(self, collator, count: int, placeholder_id: int = 0, slot_input: str = "") -> None:
        self.collator, self.count, self.placeholder_id, self.slot_input = collator, count, placeholder_id, slot_input

    def __call__(self, features: Sequence[Mapping[str, Any]]) -> dict[str, torch.Tensor]:
        batch = dict(self.collator(features))
        ids = batch["input_ids"]
        B, n = ids.shape[0], self.count
        mask = batch.get("attention_mask")
        if mask is None:
            mask = torch.ones_like(ids)
        first = mask.long().argmax(dim=1)  # first real token of each row
        width = ids.shape[1] + n
        cols = torch.arange(width).unsqueeze(0)
        soft = (cols >= first[:, None]) & (cols < first[:, None] + n)  # (B, width)
        source = cols - n * (cols >= first[:, None] + n).long()  # where each old position moved from
        source = source.clamp(max=ids.shape[1] - 1).expand(B, width)

        def spread(t: torch.Tensor, fill: int) -> torch.Tensor:
            return t.gather(1, source).masked_fill(soft, fill)

        out = {"input_ids": spread(ids, self.placeholder_id), "attention_mask": spread(mask, 1)}
        if "labels" in batch:
            out["labels"] = spread(batch["labels"], IGNORE_INDEX)
        index = torch.full((B, width), SLOT_PAD, dtype=torch.long)
        out[self.slot_input] = index.masked_scatter(soft, torch.arange(n).repeat(B))
        for name, value in batch.items():
            if name not in out:
                if torch.is_tensor(value) and value.dim() == 2 and value.shape == ids.shape:
                    raise ValueError(
                        f"cannot place soft tokens in front of batch input {name!r}; "
                        "use SFTConfig(padding_free=False) and no per-token extra columns."
                    )
                out[name] = value
        return out


class PStarSFTTrainer(AdapterCheckpointMixin, SFTTrainer):
    """TRL's ``SFTTrainer`` for a ``PStarModel`` (see the module docstring)."""

    def __init__(self, model, *args, **kwargs) -> None:
        super().__init__(model, *args, **kwargs)
        # SFTTrainer patched model.forward (an instance attribute) with its fused LM head: drop it
        self.model.__dict__.pop("forward", None)
        core = self._pstar_model()
        if core.method.slot_input is not None:
            pad = self.processing_class.pad_token_id if hasattr(self.processing_class, "pad_token_id") else None
            self.data_collator = SoftTokensInFront(
                self.data_collator, core.method_config.num_virtual_tokens, pad or 0, core.method.slot_input
            )

    # TRL's columns (its prepared input_ids/labels), not the model's signature
    _set_signature_columns_if_needed = SFTTrainer._set_signature_columns_if_needed

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        return Trainer.compute_loss(
            self, model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch
        )

"""Shared running logic of methods that put virtual token embeddings into the input sequence
(prompt tuning: a block inserted at one index; p-tuning: embeddings written into template slots).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from pstar_plugins.core.inputs import (
    IGNORE_INDEX,
    accepts,
    fill_position_ids,
    gather_positions,
    insert_block,
    is_encoder_decoder,
)
from pstar_plugins.errors import ConfigError
from pstar_plugins.methods.base import PromptMethod


class EmbeddingPromptMethod(PromptMethod):
    """Subclasses implement :meth:`virtual_block` and/or :meth:`fill_slots`."""

    def virtual_block(self, batch: int, task_ids: torch.Tensor | None) -> torch.Tensor | None:
        """``(N, m, hidden)`` embeddings to insert (N = 1 or ``batch``), or ``None``."""
        return None

    def insertion_index(self, input_ids: torch.Tensor | None, mask: torch.Tensor) -> torch.Tensor:
        """Where the block goes in each row, ``(B,)``; default: in front of everything."""
        return torch.zeros(mask.shape[0], dtype=torch.long, device=mask.device)

    def fill_slots(self, embeds: torch.Tensor, inputs: dict[str, Any]) -> torch.Tensor:
        """Overwrite template slots of ``embeds`` (``(B, L, hidden)``); default: unchanged."""
        return embeds

    # -----------------------------------------------------------------------------------
    def _embed(self, base_model: nn.Module, inputs: dict[str, Any], task_ids) -> dict[str, Any]:
        """Turn ``input_ids`` into ``inputs_embeds`` with the virtual tokens in place.

        Returns a dict with the base-model inputs and bookkeeping: ``user_index`` (``(B, L)``,
        where each user token went, or ``None``) and ``at_start`` (block in front of every row).
        """
        input_ids = inputs.pop("input_ids", None)
        embeds = inputs.pop("inputs_embeds", None)
        if embeds is None:
            if input_ids is None:
                raise ConfigError("pass input_ids or inputs_embeds.")
            embeds = base_model.get_input_embeddings()(input_ids)
        B, L = embeds.shape[:2]
        mask = inputs.get("attention_mask")
        if mask is None:
            mask = torch.ones(B, L, dtype=torch.long, device=embeds.device)
        embeds = self.fill_slots(embeds, inputs)
        task_ids = self.check_task_ids(task_ids, B)
        block = self.virtual_block(B, task_ids)
        info: dict[str, Any] = {"user_index": None, "at_start": True, "length": L}
        if block is not None:
            m = block.shape[1]
            block = block.to(embeds.dtype).expand(B, m, block.shape[-1])
            at = self.insertion_index(input_ids, mask)
            embeds, user_index = insert_block(embeds, block, at)
            mask, _ = insert_block(mask, torch.ones(B, m, dtype=mask.dtype, device=mask.device), at)
            positions = inputs.get("position_ids")
            if positions is not None:  # virtual tokens continue from the user position they precede
                start = positions.gather(1, at.clamp(max=L - 1).unsqueeze(1))
                shifted = positions + m * (torch.arange(L, device=at.device)[None] >= at[:, None]).long()
                virtual = start + torch.arange(m, device=at.device)[None]
                inputs["position_ids"], _ = insert_block(shifted, virtual, at)
            info.update(user_index=user_index, at_start=bool((at == 0).all()))
        inputs["inputs_embeds"] = embeds
        inputs["attention_mask"] = mask
        return info

    def run(self, base_model, inputs, task_ids):
        info = self._embed(base_model, inputs, task_ids)
        fill_position_ids(base_model, inputs)
        labels = inputs.get("labels")
        user_index = info["user_index"]
        if user_index is None or is_encoder_decoder(base_model):
            return base_model(**inputs)  # sequence length unchanged, or labels belong to the decoder
        if info["at_start"] and accepts(base_model, "logits_to_keep") and inputs.get("logits_to_keep") is None:
            # the user's tokens are the last L positions: no logits (and no loss) at virtual positions
            inputs["logits_to_keep"] = info["length"]
            return base_model(**inputs)
        if labels is not None:
            # virtual positions get IGNORE_INDEX: they never enter the loss
            padded = labels.new_full(inputs["inputs_embeds"].shape[:2], IGNORE_INDEX)
            inputs["labels"] = padded.scatter(1, user_index, labels)
        out = base_model(**inputs)
        if getattr(out, "logits", None) is not None:
            out.logits = gather_positions(out.logits, user_index)
        return out

    def generate(self, base_model, inputs, task_ids, **kwargs):
        input_ids = inputs.get("input_ids")
        for name in self.generate_input_names():
            if name in kwargs:
                inputs[name] = kwargs.pop(name)
        self._embed(base_model, inputs, task_ids)
        out = base_model.generate(inputs_embeds=inputs["inputs_embeds"], attention_mask=inputs["attention_mask"], **kwargs)
        if is_encoder_decoder(base_model) or input_ids is None:
            return out
        return torch.cat([input_ids, out.to(input_ids.device)], dim=1)

    def generate_input_names(self) -> tuple[str, ...]:
        """Extra inputs the method reads in generate() (e.g. ``prompt_index``)."""
        return ()

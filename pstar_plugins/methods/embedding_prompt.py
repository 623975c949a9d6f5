"""Shared running logic of methods that put virtual token embeddings into the input sequence
(prompt tuning: a block inserted at one index; p-tuning: embeddings written into template slots).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from pstar_plugins.contract.errors import ConfigError
from pstar_plugins.contract.method import PromptMethod
from pstar_plugins.mechanisms.base_calls import call_base, generate_base
from pstar_plugins.mechanisms.geometry import hidden_size
from pstar_plugins.mechanisms.inputs import (
    IGNORE_INDEX,
    accepts,
    fill_position_ids,
    first_real_index,
    gather_positions,
    insert_block,
    is_encoder_decoder,
)


class EmbeddingPromptMethod(PromptMethod):
    """Subclasses implement :meth:`virtual_block` and/or :meth:`fill_slots`."""

    def virtual_block(self, batch: int, task_ids: torch.Tensor | None) -> torch.Tensor | None:
        """``(N, m, hidden)`` embeddings to insert (N = 1, or one row per entry of ``task_ids``),
        or ``None``. It may depend on ``task_ids`` only, not on the batch's tokens: at inference
        prompt tuning runs each distinct block once and serves its keys/values to every row."""
        return None

    def insertion_index(self, input_ids: torch.Tensor | None, mask: torch.Tensor) -> torch.Tensor:
        """Where the block goes in each row, ``(B,)``.

        Default: right before the first real token, i.e. after any left padding. The prompt then
        touches the text in every row, so models without ``position_ids`` (T5's relative bias,
        BART's learned positions) see the same distances as for the example alone.
        """
        return first_real_index(mask)

    def fill_slots(self, embeds: torch.Tensor, inputs: dict[str, Any]) -> torch.Tensor:
        """Overwrite template slots of ``embeds`` (``(B, L, hidden)``); default: unchanged."""
        return embeds

    @staticmethod
    def peft_embedding_config(base_model: nn.Module) -> dict[str, Any]:
        """The ``adapter_config.json`` fields PEFT's virtual-token adapters share."""
        config = base_model.config
        text = config.get_text_config() if hasattr(config, "get_text_config") else config
        return {
            "token_dim": hidden_size(config),
            "num_attention_heads": int(text.num_attention_heads),
            "num_layers": int(text.num_hidden_layers),
        }

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
        user_mask = mask
        task_ids = self.check_task_ids(task_ids, B)
        if self.contributing:
            embeds = self.fill_slots(embeds, inputs)
            block = self.virtual_block(B, task_ids)
        else:  # the bare model's call: the method's own inputs are dropped, nothing is inserted
            for name in self.input_pads:
                inputs.pop(name, None)
            block = None
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
            # "at start": the block sits between the left padding and the text in every row, so
            # the user's real tokens are exactly the last L positions
            info.update(
                user_index=user_index, at_start=bool((at == first_real_index(user_mask)).all()), user_mask=user_mask
            )
        inputs["inputs_embeds"] = embeds
        inputs["attention_mask"] = mask
        return info

    def run(self, base_model, inputs, task_ids):
        info = self._embed(base_model, inputs, task_ids)
        fill_position_ids(base_model, inputs)
        labels = inputs.get("labels")
        user_index = info["user_index"]
        if is_encoder_decoder(base_model):
            return base_model(**inputs)  # labels belong to the decoder
        if user_index is None:
            return call_base(self, base_model, inputs)  # sequence length unchanged
        keep = inputs.get("logits_to_keep")
        if (
            info["at_start"]
            and accepts(base_model, "logits_to_keep")
            and (keep is None or isinstance(keep, int) and 0 < keep <= info["length"])
        ):
            # the user's real tokens are the last L positions: no logits (and no loss) at virtual
            # positions; labels on left padding (now facing virtual tokens) are ignored
            inputs["logits_to_keep"] = keep or info["length"]
            if labels is not None:
                inputs["labels"] = labels.masked_fill(info["user_mask"].to(labels.device) == 0, IGNORE_INDEX)
            return call_base(self, base_model, inputs)
        if labels is not None:
            # virtual positions get IGNORE_INDEX: they never enter the loss
            padded = labels.new_full(inputs["inputs_embeds"].shape[:2], IGNORE_INDEX)
            inputs["labels"] = padded.scatter(1, user_index, labels)
        inputs.pop("logits_to_keep", None)  # columns of the user's sequence: applied after realignment
        out = call_base(self, base_model, inputs, packable=False)  # logits of every column: realigned below
        if getattr(out, "logits", None) is not None:
            out.logits = gather_positions(out.logits, self._prediction_index(base_model, user_index))
            if isinstance(keep, int) and keep > 0:
                out.logits = out.logits[:, -keep:]
        return out

    @staticmethod
    def _prediction_index(base_model, user_index: torch.Tensor) -> torch.Tensor:
        """Which output position to report for each user token.

        A causal LM's logits at user token j predict token j+1, and that prediction is made at
        the position right before token j+1, which is the last virtual token when the block sits
        between them (``after_bos``). Masked LMs predict each token at its own position.
        """
        if not (base_model.can_generate() and not is_encoder_decoder(base_model)):
            return user_index
        following = torch.cat([user_index[:, 1:] - 1, user_index[:, -1:]], dim=1)
        return following

    def generate(self, base_model, inputs, task_ids, **kwargs):
        input_ids = inputs.get("input_ids")
        for name in self.input_pads:
            if name in kwargs:
                inputs[name] = kwargs.pop(name)
        self._embed(base_model, inputs, task_ids)
        out = generate_base(
            self,
            base_model,
            {"inputs_embeds": inputs["inputs_embeds"], "attention_mask": inputs["attention_mask"]},
            **kwargs,
        )
        if is_encoder_decoder(base_model) or input_ids is None:
            return out
        return torch.cat([input_ids, out.to(input_ids.device)], dim=1)

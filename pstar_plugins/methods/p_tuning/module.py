"""P-tuning: soft tokens sit wherever the template put them; their embeddings come from the
prompt encoder. Inputs carry ``prompt_index`` (``(B, L)``): the soft-token number at each
position, -1 for real tokens (``Template.encode`` produces it). The sequence length does not
change, so outputs line up with the user's tokens position for position.
"""

from __future__ import annotations

import torch
from torch import nn

from pstar_plugins.contract.capabilities import OnePassContinuations, PeftExport
from pstar_plugins.contract.errors import AdapterError, ConfigError
from pstar_plugins.contract.method import PeftPrompt
from pstar_plugins.mechanisms.distributed import embedding_rows, embedding_shape, embedding_std
from pstar_plugins.mechanisms.inputs import IGNORE_INDEX, is_encoder_decoder
from pstar_plugins.mechanisms.template import Template
from pstar_plugins.methods.embedding_prompt import EmbeddingPromptMethod
from pstar_plugins.methods.p_tuning.config import PTuningConfig
from pstar_plugins.methods.p_tuning.encoder import PromptEncoder


class PTuning(EmbeddingPromptMethod, OnePassContinuations, PeftExport):
    one_pass_continuations = True  # see OnePassContinuations
    input_pads = {"prompt_index": -1}  # the template's soft-token number at each position, -1 elsewhere
    slot_input = "prompt_index"

    def __init__(self, config: PTuningConfig, base_model: nn.Module, tokenizer=None) -> None:
        super().__init__(config)
        self.template = Template.parse(config.template)
        n = self.template.num_soft_tokens
        embedding = base_model.get_input_embeddings()
        weight = embedding.weight
        vocab_size, hidden = embedding_shape(embedding)
        if config.init == "vocab":
            ids = torch.randint(min(5000, vocab_size), (n,))
            initial = embedding_rows(embedding, ids)
        else:
            initial = torch.randn(n, hidden) * embedding_std(embedding)
        # the labels of an encoder-decoder model are the decoder's: the encoder's soft positions say nothing about them
        self.labels_follow_inputs = not is_encoder_decoder(base_model)
        self.encoder = PromptEncoder(initial.to(weight.device), config.encoder, config.encoder_hidden_size or hidden)

    @property
    def folded(self) -> bool:
        return self.encoder.static

    def fold(self) -> None:
        self.encoder.fold()

    def peft_export(self, base_model):
        positions = [i for i, part in enumerate(self.template.parts) if type(part).__name__ == "Soft"]
        if positions != [0]:
            raise AdapterError(
                "PEFT's P-tuning puts every virtual token in front of the input; the template "
                f"{self.config.template!r} places "
                "soft tokens elsewhere, which PEFT cannot express. Use a template that starts with one {soft:N} block."
            )
        hidden = self.peft_embedding_config(base_model)["token_dim"]
        return PeftPrompt(
            "P_TUNING",
            self.encoder.embedding.detach(),
            {
                **self.peft_embedding_config(base_model),
                "encoder_reparameterization_type": "MLP",
                "encoder_hidden_size": hidden,
                "encoder_num_layers": 2,
                "encoder_dropout": 0.0,
            },
        )

    def fill_slots(self, embeds, inputs):
        index = inputs.pop("prompt_index", None)
        if index is None:
            raise ConfigError(
                "p-tuning needs prompt_index (B, L) marking the template's soft-token positions; "
                "build inputs with the method's template (Template.encode) or pstar_plugins.tasks."
            )
        index = index.to(embeds.device)
        if index.shape != embeds.shape[:2]:
            raise ConfigError(f"prompt_index has shape {tuple(index.shape)}, input has {tuple(embeds.shape[:2])}.")
        soft = self.encoder().to(embeds.dtype)  # (n, hidden)
        if int(index.max()) >= soft.shape[0]:
            raise ConfigError(
                f"prompt_index refers to soft token {int(index.max())}, the template has {soft.shape[0]}."
            )
        is_soft = (index >= 0).unsqueeze(-1)
        embeds = torch.where(is_soft, soft[index.clamp(min=0)], embeds)
        labels = inputs.get("labels")
        if labels is not None and self.labels_follow_inputs:  # soft positions never enter the loss
            inputs["labels"] = labels.masked_fill(index >= 0, IGNORE_INDEX)
        return embeds

    def example_inputs(self, input_ids, attention_mask):
        """``prompt_index`` that makes the first soft-token-count real tokens of each row the
        template's soft tokens, in order (the layout ``{soft:n} {text}``)."""
        real = attention_mask.bool()
        rank = real.long().cumsum(1) - 1
        n = self.template.num_soft_tokens
        return {"prompt_index": torch.where(real & (rank < n), rank, torch.full_like(rank, -1))}

    def param_groups(self, learning_rate, weight_decay):
        embedding = [self.encoder.embedding]
        rest = [p for n, p in self.encoder.named_parameters() if n != "embedding"]
        groups = [{"name": "soft-tokens", "params": embedding, "lr": learning_rate, "weight_decay": 0.0}]
        if rest:
            groups.append({"name": "prompt-encoder", "params": rest, "lr": learning_rate, "weight_decay": weight_decay})
        return groups

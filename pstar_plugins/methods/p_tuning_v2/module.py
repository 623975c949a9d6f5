"""P-tuning v2: the prefix machinery on every (or a chosen subset of) layers, plus a linear head
on the backbone's hidden states.

Prompts live only in the attention keys/values, so the hidden states the head reads are the
user's tokens only: pooling can never read a virtual position.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F
from transformers.modeling_outputs import SequenceClassifierOutput, TokenClassifierOutput

from pstar_plugins.contract.capabilities import TokenizerCheck
from pstar_plugins.contract.errors import AdapterError, ConfigError, IncompatibleModelError
from pstar_plugins.mechanisms.base_calls import call_base
from pstar_plugins.mechanisms.geometry import hidden_size
from pstar_plugins.mechanisms.inputs import IGNORE_INDEX, fill_position_ids, first_real_index, is_encoder_decoder
from pstar_plugins.methods.p_tuning_v2.config import PTuningV2Config
from pstar_plugins.methods.prefix_tuning.module import PrefixTuning


def last_real_index(mask: torch.Tensor) -> torch.Tensor:
    """Index of the last non-padding token of each row (works for left and right padding)."""
    positions = torch.arange(mask.shape[1], device=mask.device).expand_as(mask)
    return (positions * (mask > 0)).argmax(dim=-1)


class PTuningV2(PrefixTuning, TokenizerCheck):
    one_pass_continuations = True  # see OnePassContinuations

    def __init__(self, config: PTuningV2Config, base_model: nn.Module, tokenizer=None) -> None:
        if config.head != "none" and is_encoder_decoder(base_model):
            raise IncompatibleModelError(
                "p-tuning-v2 classification heads are for encoder-only and decoder-only models; use "
                "--head none (deep prompts with the LM head) or prefix-tuning for encoder-decoder models."
            )
        super().__init__(config, base_model, layers=config.layers or None, tokenizer=tokenizer)
        self.decoder_only = bool(getattr(base_model.config, "is_decoder", False)) or any(
            getattr(s.module, "is_causal", False) for s in self.injector.sites
        )
        if config.head != "none":
            device = next(base_model.parameters()).device
            self.head = nn.Linear(hidden_size(base_model.config), config.num_labels, device=device, dtype=torch.float32)
            self.head_dropout = nn.Dropout(config.classifier_dropout)
            if self._head_from_label_words(base_model, tokenizer):
                self._init_head_from_label_words(base_model, tokenizer)

    def _head_from_label_words(self, base_model, tokenizer) -> bool:
        """Whether the head starts from the label words' rows of the LM head.

        A decoder's last position is the one its LM head predicts the answer word from, so a
        linear head whose rows are the label words' output embeddings starts with the label-word
        verbalizer's class scores instead of chance: their softmax over the classes is the same for
        single-token words on families whose LM head neither scales nor caps logits, and
        multi-token words start from their first token. WARP (Hambardzumyan et al. 2021)
        initialises its class embeddings from the label words in the same way. An encoder's pooled
        first token or a mean has no such correspondence.
        """
        config = self.config
        if config.head != "sequence-classification" or config.head_init == "random":
            return False
        reads_answer_position = self.decoder_only and config.pooling in ("auto", "last")
        usable = reads_answer_position and tokenizer is not None and base_model.get_output_embeddings() is not None
        explicit = config.head_init == "label-words"
        if explicit and not usable:
            raise ConfigError(
                "head_init='label-words' needs a decoder-only model with its LM head, last-token pooling and a "
                "tokenizer "
                f"(model_type {base_model.config.model_type!r}, pooling {config.pooling!r}); pass --head-init random."
            )
        if len(config.label_words) != config.num_labels:
            if explicit:
                raise ConfigError(
                    f"head_init='label-words' needs one label word per class: got {len(config.label_words)} "
                    f"words for num_labels={config.num_labels}; pass --label-words with {config.num_labels} "
                    "words or --head-init random."
                )
            return False
        if usable and not self._distinct_first_tokens(config, tokenizer):
            return False
        return usable

    @classmethod
    def check_tokenizer(cls, config: PTuningV2Config, tokenizer) -> None:
        """An explicit ``head_init='label-words'`` needs words that tokenise and start differently."""
        if config.head == "sequence-classification" and config.head_init == "label-words" and tokenizer is not None:
            cls._distinct_first_tokens(config, tokenizer)

    @classmethod
    def _distinct_first_tokens(cls, config: PTuningV2Config, tokenizer) -> bool:
        """Whether the label words' first tokens differ (two classes would start from the same
        row otherwise); with an explicit ``head_init='label-words'`` the answer must be yes."""
        firsts = [cls._first_token(tokenizer, w) for w in config.label_words]
        if len(set(firsts)) == len(firsts):
            return True
        if config.head_init == "label-words":
            raise ConfigError(
                f"label words {config.label_words} share first tokens, so their head rows would start "
                "equal; choose words that start differently, or pass --head-init random."
            )
        return False

    @staticmethod
    def _first_token(tokenizer, word: str) -> int:
        tokens = tokenizer(" " + word.strip(), add_special_tokens=False)["input_ids"]  # as the verbalizer tokenises
        if not tokens:
            raise ConfigError(f"label word {word!r} tokenises to nothing; choose real words with --label-words.")
        return tokens[0]

    def _init_head_from_label_words(self, base_model, tokenizer) -> None:
        from pstar_plugins.mechanisms.distributed import embedding_rows, gathered

        ids = [self._first_token(tokenizer, word) for word in self.config.label_words]
        output = base_model.get_output_embeddings()
        with torch.no_grad():
            self.head.weight.copy_(embedding_rows(output, torch.tensor(ids)).to(self.head.weight.device))
            bias = getattr(output, "bias", None)
            if bias is not None:
                with gathered([bias]):
                    self.head.bias.copy_(bias.detach()[torch.tensor(ids, device=bias.device)].float())
            else:
                self.head.bias.zero_()

    def pool(self, hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        pooling = self.config.pooling
        if pooling == "auto":
            pooling = "last" if self.decoder_only else "first"
        if pooling == "mean":
            weights = mask.unsqueeze(-1).to(hidden.dtype)
            return (hidden * weights).sum(1) / weights.sum(1).clamp(min=1)
        index = last_real_index(mask) if pooling == "last" else first_real_index(mask)
        return hidden[torch.arange(hidden.shape[0], device=hidden.device), index]

    def run(self, base_model, inputs, task_ids):
        if self.config.head == "none":
            return super().run(base_model, inputs, task_ids)
        labels = inputs.pop("labels", None)
        backbone = base_model.base_model  # the transformer without its LM head
        task_ids = self.check_task_ids(task_ids, self._batch_size(inputs))
        fill_position_ids(backbone, inputs)
        mask = inputs.get("attention_mask")
        with self.injector.activate_tasks(task_ids, self.prefixes) as while_packed:
            out = call_base(
                self, backbone, inputs, causal_lm=False, packable=self.decoder_only, while_packed=while_packed
            )
        hidden = out.last_hidden_state.float()
        if mask is None:
            mask = torch.ones(hidden.shape[:2], dtype=torch.long, device=hidden.device)
        if self.config.head == "sequence-classification":
            logits = self.head(self.head_dropout(self.pool(hidden, mask)))  # (B, num_labels)
            loss = F.cross_entropy(logits, labels.to(logits.device)) if labels is not None else None
            return SequenceClassifierOutput(loss=loss, logits=logits)
        logits = self.head(self.head_dropout(hidden))  # (B, L, num_labels)
        loss = None
        if labels is not None:
            labels = labels.to(logits.device).masked_fill(mask == 0, IGNORE_INDEX)
            loss = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=IGNORE_INDEX)
        return TokenClassifierOutput(loss=loss, logits=logits)

    def generate(self, base_model, inputs, task_ids, **kwargs):
        if self.config.head != "none":
            raise IncompatibleModelError(
                "a p-tuning-v2 adapter with a classification head does not generate; use head='none'."
            )
        return super().generate(base_model, inputs, task_ids, **kwargs)

    def peft_export(self, base_model):
        if self.config.head != "none":
            raise AdapterError(
                "a p-tuning-v2 adapter with a classification head has no PEFT equivalent; export needs head='none'."
            )
        return super().peft_export(base_model)

    def param_groups(self, learning_rate, weight_decay):
        groups = [g for g in super().param_groups(learning_rate, weight_decay)]
        head = {id(p) for p in self.head.parameters()} if self.config.head != "none" else set()
        for g in groups:
            g["params"] = [p for p in g["params"] if id(p) not in head]
        if head:
            groups.append(
                {
                    "name": "head",
                    "params": list(self.head.parameters()),
                    "lr": learning_rate,
                    "weight_decay": weight_decay,
                }
            )
        return groups

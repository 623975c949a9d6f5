"""Class scores from a language model through label words (the answer space of a template).

One scorer serves zero-shot prompting, in-context learning and every tuned prompt, so numbers
are comparable. Causal LMs: the log-probability of each label word's tokens after the text
(multi-token words are scored token by token, teacher-forced). Masked LMs: the answer slot is
``k`` mask tokens (``k`` = longest label word) and a word scores the mean log-probability of its
tokens at the first masks (the PET convention for multi-token verbalizers).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch.nn import functional as F

from pstar_plugins.errors import ConfigError
from pstar_plugins.tasks.template import Template


@dataclass
class EncodedBatch:
    inputs: dict[str, torch.Tensor]
    answer_index: torch.Tensor  # (B,) position of the answer slot in each row
    labels: torch.Tensor | None


class Verbalizer:
    def __init__(self, tokenizer, template: Template, label_words: list[str], masked_lm: bool) -> None:
        if not template.has_answer:
            raise ConfigError(f"template {template.text!r} has no {{answer}} slot; add one where the label word goes.")
        if not masked_lm:
            template.check_answer_last()
        from pstar_plugins.arguments import check_label_words

        check_label_words(list(label_words))
        self.tokenizer = tokenizer
        self.template = template
        self.masked_lm = masked_lm
        self.words = [list(tokenizer(" " + w.strip(), add_special_tokens=False)["input_ids"]) for w in label_words]
        empty = [w for w, ids in zip(label_words, self.words) if not ids]
        if empty:
            raise ConfigError(f"label words {empty} tokenise to nothing; choose real words with --label-words.")
        same = sorted({w for w, ids in zip(label_words, self.words) if self.words.count(ids) > 1})
        if same:
            raise ConfigError(f"label words {same} tokenise to the same tokens, so their classes could not be told apart; "
                              "choose distinct words with --label-words.")
        self.single_token = all(len(ids) == 1 for ids in self.words)
        self.mask_id = getattr(tokenizer, "mask_token_id", None)
        if masked_lm and self.mask_id is None:
            raise ConfigError("a masked-LM verbalizer needs a tokenizer with a mask token.")
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0

    def encode(self, examples: list[dict[str, Any]], labels: list[int] | None = None, max_length: int = 256) -> EncodedBatch:
        rows = []
        for ex in examples:
            answer = [self.mask_id] * max(len(w) for w in self.words) if self.masked_lm else None
            enc = self.template.encode(ex, self.tokenizer, answer_ids=answer, placeholder_id=self.pad_id,
                                       stop_at_answer=not self.masked_lm, add_special_tokens=True)
            ids, index, at = enc.input_ids, enc.prompt_index, enc.answer_index
            if not self.masked_lm:  # drop special tokens appended after the text (they follow the answer)
                ids, index = ids[:at], index[:at]
            if len(ids) > max_length:  # keep the end, where the answer is
                cut = len(ids) - max_length
                ids, index, at = ids[cut:], index[cut:], at - cut
            rows.append((ids, index, at))
        length = max(len(r[0]) for r in rows)
        B = len(rows)
        input_ids = torch.full((B, length), self.pad_id, dtype=torch.long)
        mask = torch.zeros(B, length, dtype=torch.long)
        prompt_index = torch.full((B, length), -1, dtype=torch.long)
        answer_index = []
        for i, (ids, index, at) in enumerate(rows):
            # causal LMs: left padding, so every row's answer slot is the end (one logit per row);
            # masked LMs: right padding
            start = length - len(ids) if not self.masked_lm else 0
            input_ids[i, start:start + len(ids)] = torch.tensor(ids)
            mask[i, start:start + len(ids)] = 1
            prompt_index[i, start:start + len(ids)] = torch.tensor(index)
            answer_index.append(start + at)
        inputs = {"input_ids": input_ids, "attention_mask": mask}
        if (prompt_index >= 0).any():
            inputs["prompt_index"] = prompt_index
        return EncodedBatch(inputs, torch.tensor(answer_index), torch.tensor(labels) if labels is not None else None)

    def class_scores(self, model, batch: EncodedBatch, linear_head: bool) -> torch.Tensor:
        """``(B, C)`` class scores: a classification head's logits, or the label words' log-probabilities."""
        if linear_head:
            device = next(model.parameters()).device
            return model(**{k: v.to(device) for k, v in batch.inputs.items()}).logits.float()
        return self.scores(model, batch)

    def scores(self, model, batch: EncodedBatch) -> torch.Tensor:
        """``(B, C)`` log-probabilities of the label words (unnormalised across classes)."""
        device = next(model.parameters()).device
        inputs = {k: v.to(device) for k, v in batch.inputs.items()}
        at = batch.answer_index.to(device)
        rows = torch.arange(at.shape[0], device=device)
        if self.masked_lm:
            logp = F.log_softmax(model(**inputs).logits.float(), dim=-1)
            out = []
            for word in self.words:
                per = [logp[rows, at + k, tok] for k, tok in enumerate(word)]
                out.append(torch.stack(per, -1).mean(-1))
            return torch.stack(out, -1)
        if self.single_token:
            logits = model(**inputs, logits_to_keep=1).logits[:, -1]  # the answer slot ends every row
            return F.log_softmax(logits.float(), dim=-1)[:, [w[0] for w in self.words]]
        # multi-token words: append each word and sum its tokens' log-probabilities
        out = []
        for word in self.words:
            k = len(word)
            word_t = torch.tensor(word, device=device).expand(at.shape[0], k)
            extended = dict(inputs)
            extended["input_ids"] = torch.cat([inputs["input_ids"], word_t], 1)
            extended["attention_mask"] = torch.cat([inputs["attention_mask"], torch.ones_like(word_t)], 1)
            if "prompt_index" in inputs:
                extended["prompt_index"] = torch.cat([inputs["prompt_index"], torch.full_like(word_t, -1)], 1)
            logits = model(**extended, logits_to_keep=k + 1).logits[:, :-1]  # positions predicting the word
            logp = F.log_softmax(logits.float(), dim=-1)
            out.append(logp.gather(2, word_t.unsqueeze(-1)).squeeze(-1).sum(-1))
        return torch.stack(out, -1)

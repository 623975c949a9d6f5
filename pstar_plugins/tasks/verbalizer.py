"""Class scores from a language model through label words (the answer space of a template).

One scorer serves zero-shot prompting, in-context learning and every tuned prompt, so numbers
are comparable. Causal LMs: the log-probability of each label word's tokens after the text
(multi-token words are scored token by token, teacher-forced: the input runs once with a
KV cache and every class's continuation once from it, see "one-pass scoring" below). Masked LMs: the answer slot is
``k`` mask tokens (``k`` = longest label word) and a word scores the mean log-probability of its
tokens at the first masks (the PET convention for multi-token verbalizers).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, ContextManager

import torch
from torch import nn
from torch.nn import functional as F
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from pstar_plugins.assembly.model import slot_input_of
from pstar_plugins.contract.errors import ConfigError, IncompatibleModelError
from pstar_plugins.mechanisms import fast_paths
from pstar_plugins.mechanisms.fast_paths import has_sliding_layers
from pstar_plugins.mechanisms.inputs import cache_argument
from pstar_plugins.mechanisms.recording import Recorder
from pstar_plugins.mechanisms.template import SLOT_PAD, TEMPLATE_SLOTS, Template, bind_slots, check_label_words

logger = logging.getLogger(__name__)


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
            raise ConfigError(
                f"label words {same} tokenise to the same tokens, so their classes could not be told apart; "
                "choose distinct words with --label-words."
            )
        self.single_token = all(len(ids) == 1 for ids in self.words)
        self.mask_id = getattr(tokenizer, "mask_token_id", None)
        if masked_lm and self.mask_id is None:
            raise ConfigError("a masked-LM verbalizer needs a tokenizer with a mask token.")
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0

    @classmethod
    def of_token_ids(cls, words: list[list[int]], pad_id: int = 0) -> "Verbalizer":
        """A causal-LM scorer for label words already tokenised (one list of token ids per class),
        for batches built elsewhere (:meth:`scores`, :meth:`scores_one_pass`,
        :meth:`scores_per_class`); it has no template, so it encodes nothing itself."""
        if len({tuple(w) for w in words}) != len(words) or not all(words):
            raise ConfigError(f"label words {words}: expected one distinct, non-empty token list per class.")
        scorer = cls.__new__(cls)
        scorer.tokenizer = scorer.template = scorer.mask_id = None
        scorer.masked_lm = False
        scorer.words = [list(w) for w in words]
        scorer.single_token = all(len(w) == 1 for w in words)
        scorer.pad_id = pad_id
        return scorer

    def encode(
        self, examples: list[dict[str, Any]], labels: list[int] | None = None, max_length: int = 256
    ) -> EncodedBatch:
        rows = []
        for ex in examples:
            answer = [self.mask_id] * max(len(w) for w in self.words) if self.masked_lm else None
            enc = self.template.encode(
                ex,
                self.tokenizer,
                answer_ids=answer,
                placeholder_id=self.pad_id,
                stop_at_answer=not self.masked_lm,
                add_special_tokens=True,
            )
            ids, index, at = enc.input_ids, enc.slots, enc.answer_index
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
        slots = torch.full((B, length), SLOT_PAD, dtype=torch.long)
        answer_index = []
        for i, (ids, index, at) in enumerate(rows):
            # causal LMs: left padding, so every row's answer slot is the end (one logit per row);
            # masked LMs: right padding
            start = length - len(ids) if not self.masked_lm else 0
            input_ids[i, start : start + len(ids)] = torch.tensor(ids)
            mask[i, start : start + len(ids)] = 1
            slots[i, start : start + len(ids)] = torch.tensor(index)
            answer_index.append(start + at)
        inputs = {"input_ids": input_ids, "attention_mask": mask}
        if (slots != SLOT_PAD).any():
            inputs[TEMPLATE_SLOTS] = slots
        return EncodedBatch(inputs, torch.tensor(answer_index), torch.tensor(labels) if labels is not None else None)

    def class_scores(self, model, batch: EncodedBatch, linear_head: bool) -> torch.Tensor:
        """``(B, C)`` class scores: a classification head's logits, or the label words' log-probabilities."""
        if linear_head:
            device = next(model.parameters()).device
            return model(
                **bind_slots({k: v.to(device) for k, v in batch.inputs.items()}, slot_input_of(model))
            ).logits.float()
        return self.scores(model, batch)

    def scores(self, model, batch: EncodedBatch) -> torch.Tensor:
        """``(B, C)`` log-probabilities of the label words (unnormalised across classes).

        Multi-token words on a causal LM are scored in one pass where that is exact
        (:meth:`scores_one_pass`, :func:`one_pass_unsupported_reason`), else per class
        (:meth:`scores_per_class`); :func:`recording` shows which path each call took.
        """
        device = next(model.parameters()).device
        inputs = {k: v.to(device) for k, v in batch.inputs.items()}
        at = batch.answer_index.to(device)
        rows = torch.arange(at.shape[0], device=device)
        if self.masked_lm:
            logp = F.log_softmax(model(**bind_slots(inputs, slot_input_of(model))).logits.float(), dim=-1)
            out = []
            for word in self.words:
                per = [logp[rows, at + k, tok] for k, tok in enumerate(word)]
                out.append(torch.stack(per, -1).mean(-1))
            return torch.stack(out, -1)
        if self.single_token:
            logits = model(**bind_slots(inputs, slot_input_of(model)), logits_to_keep=1).logits[
                :, -1
            ]  # the answer slot ends every row
            return F.log_softmax(logits.float(), dim=-1)[:, [w[0] for w in self.words]]
        reason = one_pass_unsupported_reason(model)
        if reason is None:
            scores, reason = self._one_pass(model, inputs)
            if scores is not None:
                _record(None)
                return scores
        _record(reason)
        return self._per_class(model, inputs)

    def scores_one_pass(self, model, batch: EncodedBatch) -> torch.Tensor:
        """The multi-token scores of :meth:`scores` from one pass over the input and one over every
        class's continuation; raises :class:`IncompatibleModelError` where that path cannot be exact."""
        if self.masked_lm or self.single_token:
            raise IncompatibleModelError("one-pass scoring is for multi-token label words on a causal LM.")
        reason = one_pass_unsupported_reason(model)
        scores = None
        if reason is None:
            device = next(model.parameters()).device
            scores, reason = self._one_pass(model, {k: v.to(device) for k, v in batch.inputs.items()})
        if scores is None:
            raise IncompatibleModelError(f"one-pass label-word scoring cannot be exact here: {reason}.")
        return scores

    def scores_per_class(self, model, batch: EncodedBatch) -> torch.Tensor:
        """The causal-LM scores of :meth:`scores` with one model call per class (each class's word
        appended to the whole input): the reference of the one-pass path, and its fallback."""
        if self.masked_lm:
            raise IncompatibleModelError(
                "per-class scoring appends words after the input, which is for causal LMs; "
                "a masked LM's scores come from its answer slot (Verbalizer.scores)."
            )
        device = next(model.parameters()).device
        return self._per_class(model, {k: v.to(device) for k, v in batch.inputs.items()})

    def _per_class(self, model, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        device = inputs["input_ids"].device
        B = inputs["input_ids"].shape[0]
        out = []
        for word in self.words:
            k = len(word)
            word_t = torch.tensor(word, device=device).expand(B, k)
            extended = dict(inputs)
            extended["input_ids"] = torch.cat([inputs["input_ids"], word_t], 1)
            extended["attention_mask"] = torch.cat([inputs["attention_mask"], torch.ones_like(word_t)], 1)
            if TEMPLATE_SLOTS in inputs:
                extended[TEMPLATE_SLOTS] = torch.cat([inputs[TEMPLATE_SLOTS], torch.full_like(word_t, SLOT_PAD)], 1)
            extended = bind_slots(extended, slot_input_of(model))
            logits = model(**extended, logits_to_keep=k + 1).logits[:, :-1]  # positions predicting the word
            logp = F.log_softmax(logits.float(), dim=-1)
            out.append(logp.gather(2, word_t.unsqueeze(-1)).squeeze(-1).sum(-1))
        return torch.stack(out, -1)

    def _one_pass(self, model, inputs: dict[str, torch.Tensor]) -> tuple[torch.Tensor | None, str | None]:
        """Scores from the input's pass and one continuation pass, or ``(None, reason)`` when the
        frozen model's call turned out not to allow it (then nothing is left to undo)."""
        lm, holder, _ = _frozen_lm(model)
        B = inputs["input_ids"].shape[0]
        continuation = _Continuation(lm, self.words, self.pad_id, B, inputs["input_ids"].device)
        call = dict(bind_slots(inputs, slot_input_of(model)), use_cache=True, logits_to_keep=1)
        if has_sliding_layers(lm.config):
            # a cache of whole layers: the model's own sliding-window masks keep each query to its
            # window over it, in the input's call and in the continuation's alike, where a sliding
            # layer's own cache would drop the keys a full layer still needs (the call runs padded)
            call[cache_argument(lm)] = DynamicCache()
        if holder is None:  # the frozen model itself: continue from what it returns
            output = model(**call)
            continuation(lm, call, output)
        else:  # a method, or the shared-prefix cache: each continues inside its own call of the frozen model
            with holder.continuing(continuation):
                output = model(**call)
        first = output.logits[:, -1]  # (B, V): each word's first token
        if continuation.failure is None and continuation.logits is None:
            continuation.failure = "the method did not call the frozen model on the input"
        if continuation.failure is not None:
            return None, continuation.failure
        logp_first = F.log_softmax(first.float(), dim=-1)
        logp_rest = F.log_softmax(continuation.logits.float(), dim=-1)  # (B * C', T, V)
        out = []
        for c, word in enumerate(self.words):
            score = logp_first[:, word[0]]
            if len(word) > 1:
                j = continuation.classes.index(c)
                rest = logp_rest[torch.arange(B, device=first.device) * len(continuation.classes) + j, : len(word) - 1]
                target = torch.tensor(word[1:], device=first.device).expand(B, len(word) - 1)
                score = score + rest.gather(2, target.unsqueeze(-1)).squeeze(-1).sum(-1)
            out.append(score)
        return torch.stack(out, -1), None


# ----------------------------------------------------------------------------- one-pass scoring
#
# The continuations of a multi-token verbalizer share the whole input; only their last few tokens
# differ. The input runs once with a KV cache (through the method, which inserts its virtual
# tokens, fills its template slots and activates its prefixes as in any call), and, still inside
# that call of the frozen model (so that whatever the method made active for it, its prefixes,
# stays active), every class's continuation runs once from that cache: row ``b * C' + j`` holds
# the tokens of the j-th multi-token word after row b's input, attending to row b's cached keys
# and values (under the mask and at the positions the frozen model was called with) and to its
# own earlier tokens, never another class's. That is exactly the attention each word's tokens get
# in ``[input; word]``, so the log-probabilities and their gradients (through the cache to the
# prompt) equal the per-class loop's up to float rounding (tests/test_label_words.py).
#
# The scorer asks for the continuation explicitly: a method that declares it
# (:class:`~pstar_plugins.contract.capabilities.OnePassContinuations`) runs it after its call of
# the frozen model, packed or not (the packed call hands over its cache in the padded layout);
# the shared-prefix cache of in-context learning does the same; a bare model is continued from
# what it returns. Whether the path applies is the model's record
# (:mod:`pstar_plugins.mechanisms.fast_paths`), decided once.

_PATHS = Recorder()
_logged: set[str] = set()


def recording() -> ContextManager[list[str]]:
    """Collect, for every multi-token causal-LM scoring meanwhile, ``"one pass"`` or
    ``"per class (<reason>)"``."""
    return _PATHS.recording()


def _record(reason: str | None) -> None:
    _PATHS.add("one pass" if reason is None else f"per class ({reason})")
    if reason is not None and reason not in _logged:
        _logged.add(reason)
        logger.warning("multi-token label words are scored with one model call per class: %s", reason)


def _frozen_lm(model) -> tuple[nn.Module | None, Any, str | None]:
    """The frozen Hugging Face model that ``model`` finally calls, what continues from its cache
    inside its own call (the method, or the shared-prefix cache; ``None`` for the bare model), and
    the method (for the record), or a reason why none of it can be found."""
    from transformers import PreTrainedModel

    from pstar_plugins.assembly.model import PStarModel
    from pstar_plugins.tasks.baselines import SharedPrefixModel

    holder = None
    while not isinstance(model, PreTrainedModel):
        if isinstance(model, PStarModel):
            holder, model = model.method, model.base_model
        elif isinstance(model, SharedPrefixModel):
            holder, model = model, model.model
        elif isinstance(getattr(model, "module", None), nn.Module):  # DistributedDataParallel, DeepSpeed's engine
            model = model.module
        else:
            return None, None, f"{type(model).__name__} is not a model of this library or of transformers"
    return model, holder, None


def one_pass_unsupported_reason(model) -> str | None:
    """Why multi-token label words cannot be scored in one pass on ``model``, or ``None``: the
    frozen model's record (:func:`pstar_plugins.mechanisms.fast_paths.of`), then whether it trains
    with gradient checkpointing now. Depends on the model only, never on a batch: under ZeRO-3
    every rank must run the same calls."""
    lm, holder, reason = _frozen_lm(model)
    if reason is not None:
        return reason
    decided = fast_paths.of(lm, _method_of(holder)).one_pass_scoring
    if decided is not None:
        return decided
    if lm.training and torch.is_grad_enabled() and getattr(lm, "is_activation_checkpointing", False):
        return "gradient checkpointing (the frozen model keeps no cache while it trains)"
    return None


def _method_of(holder):
    from pstar_plugins.contract.method import PromptMethod

    return holder if isinstance(holder, PromptMethod) else None


class _Continuation:
    """The continuation of one :meth:`Verbalizer._one_pass`: called after the frozen model's
    call on the input (with its cache), runs every multi-token class's continuation from it."""

    def __init__(self, lm: nn.Module, words: list[list[int]], pad_id: int, batch: int, device: torch.device) -> None:
        self.lm = lm
        self.classes = [c for c, w in enumerate(words) if len(w) > 1]
        T = max(len(w) for w in words) - 1  # the tokens fed; each predicts the next one of its word
        ids = torch.full((len(self.classes), T), pad_id, dtype=torch.long, device=device)
        mask = torch.zeros(len(self.classes), T, dtype=torch.long, device=device)
        for j, c in enumerate(self.classes):
            ids[j, : len(words[c]) - 1] = torch.tensor(words[c][:-1], device=device)
            mask[j, : len(words[c]) - 1] = 1  # right padding: after every real token, seen by none
        self.ids, self.mask = ids.repeat(batch, 1), mask.repeat(batch, 1)  # row b * C' + j
        self.source = torch.arange(batch, device=device).repeat_interleave(len(self.classes))
        self.logits: torch.Tensor | None = None
        self.failure: str | None = None
        self.calls = 0

    def __call__(self, module, kwargs, output) -> None:
        """After ``module``'s call with ``kwargs`` (the padded call's) that returned ``output``."""
        if module is not self.lm:
            return  # another model's call (a backbone, an encoder): not the frozen LM's input
        self.calls += 1
        if self.calls > 1:
            self.logits, self.failure = None, "the method called the frozen model more than once"
            return
        self.failure = self._continue(module, kwargs, output)

    def _continue(self, module, kwargs, output) -> str | None:
        mask = kwargs.get("attention_mask")
        if not isinstance(mask, torch.Tensor) or mask.dim() != 2:
            return "the frozen model was called without a 2D attention mask"
        cache = getattr(output, "cache", None) or getattr(output, "past_key_values", None)
        if cache is None or not all(type(layer) is DynamicLayer for layer in getattr(cache, "layers", [None])):
            return "the frozen model returned no dynamic KV cache"
        if cache.get_seq_length() != mask.shape[1]:
            return "the frozen model's cache does not cover its attention mask"
        source = self.source.to(mask.device)
        # a new cache of whole layers (the call's own, or a caller's, is left as it is): windowed
        # layers get their window from the model's masks, as in the input's call
        expanded = DynamicCache()
        for index, layer in enumerate(cache.layers):
            expanded.update(layer.keys.index_select(0, source), layer.values.index_select(0, source), index)
        T = self.ids.shape[1]
        call: dict[str, Any] = {
            "input_ids": self.ids.to(mask.device),
            "attention_mask": torch.cat([mask[source], self.mask.to(mask.dtype)], 1),
            "use_cache": True,
            cache_argument(module): expanded,
        }
        positions = kwargs.get("position_ids")
        if positions is not None:  # the positions the word's tokens get in [input; word]: after the last one
            call["position_ids"] = positions[source, -1:] + 1 + torch.arange(T, device=positions.device)
        self.logits = module(**call).logits  # (B * C', T, V)
        return None

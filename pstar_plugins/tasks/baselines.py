"""Prompting baselines: a discrete template with an answer space, zero-shot or with k labelled
demonstrations in context (in-context learning), scored by the same verbalizer as tuned prompts.

Demonstrations are class-balanced and drawn per seed; each seed also fixes their order, since
in-context accuracy depends on both (Zhao et al. 2021, "Calibrate Before Use"). Optional
contextual calibration divides the class probabilities by those of a content-free input.
"""

from __future__ import annotations

import random
from typing import Any

import torch
from transformers import DynamicCache

from pstar_plugins.contract.capabilities import OnePassContinuations
from pstar_plugins.contract.method import CONTINUATION
from pstar_plugins.mechanisms.fast_paths import has_sliding_layers
from pstar_plugins.mechanisms.template import Answer, Field, Literal, Soft, Template


def render_demonstration(template: Template, example: dict[str, Any], label_word: str) -> str:
    """The template as plain text with the example's fields and its label word filled in."""
    out = []
    for part in template.parts:
        if isinstance(part, Literal):
            out.append(part.text)
        elif isinstance(part, Field):
            out.append(str(example[part.name]))
        elif isinstance(part, Answer):
            text = "".join(out).rstrip(" ")
            out = [text, " " + label_word.strip()]
    return "".join(out)


def balanced_demonstrations(rows: list[dict], labels: list[int], k: int, num_classes: int, seed: int) -> list[int]:
    """Indices of ``k`` demonstrations, as even across classes as ``k`` allows, in a seeded order."""
    rng = random.Random(seed)
    by_class = {c: [i for i, y in enumerate(labels) if y == c] for c in range(num_classes)}
    chosen: list[int] = []
    classes = list(range(num_classes))
    rng.shuffle(classes)
    for j in range(k):
        pool = [i for i in by_class[classes[j % num_classes]] if i not in chosen]
        if pool:
            chosen.append(rng.choice(pool))
    rng.shuffle(chosen)
    return chosen


def in_context_template(template: Template, demos: list[tuple[dict, str]], separator: str = "\n\n") -> Template:
    """A template whose text starts with the rendered demonstrations, then the query's template."""
    prefix = "".join(render_demonstration(template, ex, word) + separator for ex, word in demos)
    parts = [p for p in template.parts if not isinstance(p, Soft)]
    return Template(prefix + template.text, ([Literal(prefix)] if prefix else []) + parts)


def content_free_scores(verbalizer, model, content_free: str = "N/A") -> torch.Tensor:
    """Class probabilities for a content-free input (every field set to ``content_free``)."""
    example = {name: content_free for name in verbalizer.template.fields}
    with torch.no_grad():
        scores = verbalizer.scores(model, verbalizer.encode([example]))
    return scores.softmax(-1)[0]


def calibrate(scores: torch.Tensor, content_free_probs: torch.Tensor) -> torch.Tensor:
    """Contextual calibration: ``p(y|x) / p(y|content-free)``, renormalised (log space)."""
    probs = scores.softmax(-1) / content_free_probs.to(scores.device)
    return (probs / probs.sum(-1, keepdim=True)).log()


def accuracy_and_macro_f1(pred: list[int], gold: list[int], num_classes: int) -> tuple[float, float]:
    correct = sum(p == g for p, g in zip(pred, gold))
    f1s = []
    for c in range(num_classes):
        tp = sum(p == c and g == c for p, g in zip(pred, gold))
        fp = sum(p == c and g != c for p, g in zip(pred, gold))
        fn = sum(p != c and g == c for p, g in zip(pred, gold))
        f1s.append(0.0 if tp == 0 else 2 * tp / (2 * tp + fp + fn))
    return correct / max(1, len(gold)), sum(f1s) / num_classes


def length_order(verbalizer, rows: list[dict[str, Any]], max_length: int) -> list[int]:
    """Indices of ``rows`` from the shortest encoded prompt to the longest (ties keep their order).

    Rows are left-padded to the longest of their batch, and a pad token costs as much as a real
    one; batches of like lengths compute little padding. On RTE (prompts of 30 to 300 tokens) a
    batch of 16 in file order is about half padding."""
    lengths = [len(verbalizer.encode([row], max_length=max_length).inputs["input_ids"][0]) for row in rows]
    return sorted(range(len(rows)), key=lengths.__getitem__)


def in_original_order(values: list, order: list[int]) -> list:
    """Undo :func:`length_order`: ``values[j]`` belongs to row ``order[j]``."""
    out: list = [None] * len(order)
    for value, i in zip(values, order, strict=True):
        out[i] = value
    return out


def common_prefix(sequences: list[list[int]], margin: int = 2) -> list[int]:
    """The tokens every sequence starts with, less ``margin`` tokens: where the shared text ends,
    a merge with the following text can change the last tokens, so those stay per row."""
    first = sequences[0]
    n = len(first)
    for seq in sequences[1:]:
        n = min(n, len(seq))
        n = next((i for i in range(n) if seq[i] != first[i]), n)
    return first[: max(0, n - margin)]


class SharedPrefixModel(torch.nn.Module, OnePassContinuations):
    """A causal LM for rows that all start with the same tokens (the demonstrations of in-context
    learning): the prefix's key/value cache is computed once and reused by every batch, so each
    row runs only its own tokens. Called like the model with left-padded ``input_ids``; the rows
    see exactly the tokens, positions and attention they would see in full (tested), and a batch
    whose rows do not all start with the prefix runs in full. Inside :meth:`continuing`, one-pass
    label-word scoring continues every class from each call's cache, the prefix's included.
    """

    def __init__(self, model: torch.nn.Module, prefix_ids: list[int]) -> None:
        super().__init__()
        self.model = model
        self.prefix = torch.tensor(prefix_ids, dtype=torch.long)
        device = next(model.parameters()).device
        from pstar_plugins.mechanisms.inputs import accepts

        # transformers 5 renamed ``past_key_values`` to ``cache`` in later minor versions
        self._cache_argument = "cache" if accepts(model, "cache") else "past_key_values"
        # a cache of whole layers: ``crop`` keeps the prefix on sliding-window layers too (a
        # window-sized layer refuses to crop once full), and the model's mask still applies each
        # layer's window over it
        self._cache = DynamicCache()
        with torch.no_grad():
            model(input_ids=self.prefix[None].to(device), use_cache=True, **{self._cache_argument: self._cache})
        self._expanded: tuple[int, Any] | None = None

    def _cache_for(self, batch: int):
        import copy

        if self._expanded is None or self._expanded[0] != batch:
            cache = copy.deepcopy(self._cache)
            cache.batch_repeat_interleave(batch)
            self._expanded = (batch, cache)
        return self._expanded[1]

    def forward(self, input_ids, attention_mask, logits_to_keep: int = 0, use_cache: bool | None = None, **kwargs):
        P = self.prefix.numel()
        mask = attention_mask.bool()
        rows = [ids[m] for ids, m in zip(input_ids, mask)]
        prefix = self.prefix.to(input_ids.device)
        shared = P > 0 and all(len(r) > P and torch.equal(r[:P], prefix) for r in rows)
        # rows of unequal length put padding between the prefix and the shorter rows' tokens; a
        # sliding window counts those columns, so on such families only equal rows share the prefix
        shared = shared and (len({len(r) for r in rows}) == 1 or not has_sliding_layers(self.model.config))
        asked = kwargs.get(self._cache_argument)
        if shared and isinstance(asked, DynamicCache) and asked.get_seq_length() == 0:
            # an empty cache asked for (one-pass scoring's, to continue from): the prefix's is one,
            # of whole layers, which the continuation finds in the call
            kwargs.pop(self._cache_argument)
        if kwargs or not shared:
            if use_cache is not None:
                kwargs["use_cache"] = use_cache
            return self._call(
                input_ids=input_ids, attention_mask=attention_mask, logits_to_keep=logits_to_keep, **kwargs
            )
        # the prefix's call always uses a cache (``use_cache`` asks for one: the verbalizer's
        # one-pass scoring continues from it, and finds the prefix's keys/values there too)
        B, S = len(rows), max(len(r) for r in rows) - P
        suffix = input_ids.new_zeros((B, S))
        suffix_mask = attention_mask.new_zeros((B, S))
        for i, r in enumerate(rows):
            suffix[i, S - (len(r) - P) :] = r[P:]
            suffix_mask[i, S - (len(r) - P) :] = 1
        positions = (P + suffix_mask.cumsum(-1) - 1).clamp(min=P)
        full_mask = torch.cat([attention_mask.new_ones((B, P)), suffix_mask], 1)
        cache = self._cache_for(B)
        try:
            return self._call(
                input_ids=suffix,
                attention_mask=full_mask,
                position_ids=positions,
                use_cache=True,
                logits_to_keep=logits_to_keep,
                **{self._cache_argument: cache},
            )
        finally:
            cache.crop(P - cache.get_seq_length())  # negative: drop this batch's tokens, keep the prefix

    def _call(self, **call):
        output = self.model(**call)
        continuation = self.__dict__.get(CONTINUATION)
        if continuation is not None:  # before the prefix's cache is cropped back
            continuation(self.model, call, output)
        return output

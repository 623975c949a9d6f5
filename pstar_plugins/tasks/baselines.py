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

from pstar_plugins.tasks.template import Answer, Field, Literal, Soft, Template


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

"""What ``pstar eval`` does differently for classification and for generation, behind one
interface: reading the rows' answers (checked before any model loads), drawing demonstrations,
and scoring a model with a template (accuracy and macro-F1; BLEU and ROUGE-L)."""

from __future__ import annotations

import random
from typing import Any

from pstar_plugins.contract.spec import has_classifier_head


def score_rows(model, verbalizer, rows, labels, batch_size, max_length, calibration=None, progress=None):
    import torch

    with torch.no_grad():
        return _score_rows(model, verbalizer, rows, labels, batch_size, max_length, calibration, progress)


def _score_rows(model, verbalizer, rows, labels, batch_size, max_length, calibration, progress):
    from pstar_plugins.tasks.baselines import calibrate

    preds = []
    config = getattr(model, "method_config", None)
    head = has_classifier_head(config)
    for i in range(0, len(rows), batch_size):
        batch = verbalizer.encode(rows[i : i + batch_size], labels[i : i + batch_size], max_length=max_length)
        scores = verbalizer.class_scores(model, batch, head)
        if calibration is not None:
            scores = calibrate(scores, calibration)
        preds.extend(scores.argmax(-1).tolist())
        if progress is not None:
            progress.update(len(batch.answer_index))
    return preds


class ClassificationScoring:
    """Label-word scores at the answer position, optionally calibrated; accuracy and macro-F1."""

    metrics = ("accuracy", "macro_f1")

    def __init__(self, args) -> None:
        self.args = args
        self.num_classes = len(args.label_words)

    def read(self, rows, source) -> None:
        from pstar_plugins.tasks.data import labels_of

        self.rows, self.labels = rows, labels_of(rows, self.args.label_column, source, self.args.label_words)

    def describe(self) -> dict[str, Any]:
        return {"label_words": self.args.label_words}

    def bind(self, tokenizer) -> None:
        self.tokenizer = tokenizer

    def set_demonstrations(self, rows, source, template) -> None:
        from pstar_plugins.tasks.data import labels_of

        self.demo_rows = rows
        self.demo_labels = labels_of(rows, self.args.label_column, source, self.args.label_words)

    def score(self, name: str, model, template, calibrate: bool = False, shared_prefix: bool = False) -> dict[str, Any]:
        from tqdm.auto import tqdm

        from pstar_plugins.tasks.baselines import (
            SharedPrefixModel,
            accuracy_and_macro_f1,
            common_prefix,
            content_free_scores,
            in_original_order,
            length_order,
        )
        from pstar_plugins.tasks.verbalizer import Verbalizer

        args, rows = self.args, self.rows
        verbalizer = Verbalizer(self.tokenizer, template, args.label_words, masked_lm=args.model_kind == "masked-lm")
        calibration = content_free_scores(verbalizer, model) if calibrate else None
        if shared_prefix and args.model_kind != "masked-lm" and len(rows) > 1:
            # every prompt starts with the same demonstrations: run them once, reuse their cache
            sample = verbalizer.encode(rows[:4], max_length=args.max_length).inputs
            prefix = common_prefix(
                [ids[m.bool()].tolist() for ids, m in zip(sample["input_ids"], sample["attention_mask"])]
            )
            if len(prefix) > 8:
                model = SharedPrefixModel(model, prefix)
        order = length_order(verbalizer, rows, args.max_length)  # batches of like lengths pad little
        with tqdm(total=len(rows), desc=name, leave=False) as bar:
            preds = score_rows(
                model,
                verbalizer,
                [rows[i] for i in order],
                [self.labels[i] for i in order],
                args.batch_size,
                args.max_length,
                calibration,
                bar,
            )
        accuracy, macro_f1 = accuracy_and_macro_f1(in_original_order(preds, order), self.labels, self.num_classes)
        return {"accuracy": accuracy, "macro_f1": macro_f1}

    def score_shots(self, model, template, k: int, seed: int) -> dict[str, Any]:
        """``k`` class-balanced demonstrations drawn with ``seed`` in front of every row."""
        from pstar_plugins.tasks.baselines import balanced_demonstrations, in_context_template

        picks = balanced_demonstrations(self.demo_rows, self.demo_labels, k, self.num_classes, seed) if k else []
        demos = [(self.demo_rows[i], self.args.label_words[self.demo_labels[i]]) for i in picks]
        return self.score(
            f"{k}-shot seed {seed}",
            model,
            in_context_template(template, demos),
            self.args.calibrate,
            shared_prefix=k > 0 and not self.args.no_prefix_cache,
        )


class GenerationScoring:
    """Greedy decoding against every reference of a source; corpus BLEU and ROUGE-L."""

    metrics = ("bleu", "rouge_l")

    def __init__(self, args) -> None:
        self.args = args

    def read(self, rows, source) -> None:
        from pstar_plugins.mechanisms.template import Template
        from pstar_plugins.tasks import generation as gen

        template = Template.parse(self.args.template)
        template.check_answer_last()
        self.groups = gen.group_references(rows, template, self.args.target_column)  # checks the target column

    def describe(self) -> dict[str, Any]:
        return {"sources": len(self.groups)}

    def bind(self, tokenizer) -> None:
        self.tokenizer = tokenizer

    def set_demonstrations(self, rows, source, template) -> None:
        from pstar_plugins.tasks import generation as gen

        demo_groups = gen.group_references(rows, template, self.args.target_column)  # one demonstration per source
        self.demo_rows, self.demo_targets = [g[0] for g in demo_groups], [g[1][0] for g in demo_groups]

    def score(self, name: str, model, template, **_) -> dict[str, Any]:
        from tqdm.auto import tqdm

        from pstar_plugins.tasks import generation as gen

        with tqdm(total=len(self.groups), desc=name, leave=False) as bar:
            scores, hyps = gen.generate_and_score(
                model, template, self.tokenizer, self.groups, self.args.max_new_tokens, self.args.batch_size, bar
            )
        return {**scores, "example": hyps[:3]}

    def score_shots(self, model, template, k: int, seed: int) -> dict[str, Any]:
        """``k`` demonstrations drawn with ``seed`` (one reference each) in front of every source."""
        from pstar_plugins.tasks.baselines import in_context_template

        picks = random.Random(seed).sample(range(len(self.demo_rows)), min(k, len(self.demo_rows))) if k else []
        demos = [(self.demo_rows[i], self.demo_targets[i]) for i in picks]
        return self.score(f"{k}-shot seed {seed}", model, in_context_template(template, demos))


def make_scoring(args) -> ClassificationScoring | GenerationScoring:
    return {"classification": ClassificationScoring, "generation": GenerationScoring}[args.task](args)

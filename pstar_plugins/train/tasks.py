"""What ``pstar train`` does differently for classification and for generation, behind one
interface: reading the rows' answers, the adapter's task record, a training batch and its loss,
an evaluation and its metric, and the summary lines.

A task is made from the parsed flags before anything heavy is imported (:func:`make_task`), reads
and checks the data (:meth:`split`), and is bound to the tokenizer and template once the model
is loaded (:meth:`bind`); the training loop then only calls :meth:`loss` and :meth:`evaluate`.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from typing import Any

from pstar_plugins.contract.spec import has_classifier_head


@dataclass
class Split:
    """Rows of one split with what each must produce: class indices (classification) or, for
    generation, nothing per row (the references are grouped by source when evaluated)."""

    rows: list[dict[str, Any]]
    labels: list[int]
    source: str
    groups: list | None = field(default=None, repr=False)  # generation: (source row, references)

    def __len__(self) -> int:
        return len(self.rows)

    def take(self, indices: list[int]) -> tuple[list[dict], list[int]]:
        return [self.rows[i] for i in indices], [self.labels[i] for i in indices]


class _Task:
    kind = ""
    metric_name = ""

    def __init__(self, args) -> None:
        self.args = args
        self.device = None
        self.template = self.zero_shot_template = self.tokenizer = None

    def bind(self, tokenizer, template, zero_shot_template, device, base, head_classifier: bool) -> None:
        self.tokenizer, self.template, self.zero_shot_template, self.device = (
            tokenizer,
            template,
            zero_shot_template,
            device,
        )
        self.head_classifier = head_classifier

    def results_fields(self) -> dict[str, Any]:
        """Entries of metrics.json the task fills while it evaluates."""
        return {}

    def prepare(self, split: Split | None) -> None:
        """Anything a split needs once the template is bound (nothing, unless overridden)."""

    def record(self) -> dict[str, Any]:
        """What the adapter is for, saved with it: ``pstar eval --adapter`` then scores it as training did."""
        a = self.args
        return {
            "kind": a.task,
            "template": self.template.text,
            "max_length": a.max_length,
            "model": a.model,
            "model_kind": a.model_kind,
            "gguf_file": a.gguf_file,
        }


class ClassificationTask(_Task):
    """Label words (or a linear head) scored at the answer position; accuracy."""

    kind = "classification"
    metric_name = "accuracy"

    def split(self, rows, source) -> Split:
        from pstar_plugins.tasks.data import labels_of

        return Split(rows, labels_of(rows, self.args.label_column, source, self.args.label_words), source)

    def configure(self, config):
        """A classifier head gets one output per label word."""
        return config.for_classes(len(self.args.label_words)) if has_classifier_head(config) else config

    def bind(self, tokenizer, template, zero_shot_template, device, base, head_classifier: bool) -> None:
        from pstar_plugins.tasks.verbalizer import Verbalizer

        super().bind(tokenizer, template, zero_shot_template, device, base, head_classifier)
        masked = self.args.model_kind == "masked-lm"
        self.scorer = Verbalizer(tokenizer, template, self.args.label_words, masked_lm=masked)
        self.zero_shot_scorer = Verbalizer(tokenizer, zero_shot_template, self.args.label_words, masked_lm=masked)

    def record(self) -> dict[str, Any]:
        return {**super().record(), "label_words": list(self.args.label_words), "label_column": self.args.label_column}

    def _classify(self, model, scorer, rows, labels):
        batch = scorer.encode(rows, labels, max_length=self.args.max_length)
        return scorer.class_scores(model, batch, self.head_classifier), batch.labels.to(self.device)

    def loss(self, model, rows, labels):
        from torch.nn import functional as F

        scores, gold = self._classify(model, self.scorer, rows, labels)
        return F.cross_entropy(scores, gold)

    def evaluation_model(self, model, core):
        return model

    def evaluate(
        self, model, split: Split, desc: str, limit: int | None = None, zero_shot: bool = False, show: bool = False
    ) -> float:
        """Accuracy on the first ``limit`` rows of ``split`` (every rank calls this). The rows are
        cut into the batches one process would score, and each rank scores its round-robin share
        of them (mechanisms.distributed.share_of_this_rank), so every row is scored once, in the same
        batch as on one process; the counts are added over the ranks. A rank whose share ran out
        scores one row and drops it: DDP's first forward after a step broadcasts buffers and every
        ZeRO-3 forward gathers parameters, so every rank must call the model equally often."""
        import torch
        from tqdm.auto import tqdm

        from pstar_plugins.mechanisms import distributed

        scorer = self.zero_shot_scorer if zero_shot else self.scorer
        step = self.args.eval_batch_size
        n = min(limit or len(split), len(split))
        mine = distributed.share_of_this_rank(list(range(0, n, step)))
        model.eval()
        correct = 0
        with torch.no_grad():
            for i in tqdm(mine, desc=desc, disable=not (show and sys.stderr.isatty()), leave=False):
                # padding: the first row again, its result dropped (any call keeps the ranks in step)
                start, j = (0, 1) if i is None else (i, min(i + step, n))
                scores, gold = self._classify(model, scorer, split.rows[start:j], split.labels[start:j])
                if i is not None:
                    correct += int((scores.argmax(-1) == gold).sum())
        model.train()
        return distributed.sum_over_ranks(correct) / n

    @staticmethod
    def summary_lines(results: dict) -> list[str]:
        lines = []
        if "zero_shot_accuracy" in results:
            lines.append(f"  zero-shot dev accuracy : {results['zero_shot_accuracy']:.4f} (0-1)")
        lines.append(f"  tuned dev accuracy     : {results['tuned_accuracy']:.4f} (0-1)")
        return lines


class GenerationTask(_Task):
    """Loss on the target tokens only; greedy decoding scored with BLEU (and ROUGE-L)."""

    kind = "generation"
    metric_name = "bleu"

    def __init__(self, args) -> None:
        super().__init__(args)
        self.scores: dict[str, Any] = {}

    def split(self, rows, source) -> Split:
        return Split(rows, [0] * len(rows), source)

    def configure(self, config):
        from pstar_plugins.contract.errors import ConfigError

        if has_classifier_head(config):
            raise ConfigError("a classification head cannot generate; use --head none for --task generation.")
        return config

    def bind(self, tokenizer, template, zero_shot_template, device, base, head_classifier: bool) -> None:
        from pstar_plugins.mechanisms.inputs import accepts, is_encoder_decoder

        super().bind(tokenizer, template, zero_shot_template, device, base, head_classifier)
        # decoder-only models get logits only where a target token is predicted
        self.target_logits_only = not is_encoder_decoder(base) and accepts(base, "logits_to_keep")

    def prepare(self, split: Split | None) -> None:
        """Group a split's references by source (a source with several references is one example)."""
        from pstar_plugins.tasks import generation as gen

        if split is not None:
            split.groups = gen.group_references(split.rows, self.template, self.args.target_column)

    def results_fields(self) -> dict[str, Any]:
        return {"generation_scores": self.scores}

    def record(self) -> dict[str, Any]:
        return {
            **super().record(),
            "target_column": self.args.target_column,
            "max_new_tokens": self.args.max_new_tokens,
        }

    def loss(self, model, rows, labels):
        from pstar_plugins.assembly.model import slot_input_of
        from pstar_plugins.mechanisms.template import bind_slots
        from pstar_plugins.tasks import generation as gen

        batch = gen.training_batch(self.template, self.tokenizer, rows, self.args.target_column, self.args.max_length)
        batch = {k: v.to(self.device) for k, v in batch.items()}
        if self.target_logits_only:
            return gen.target_token_loss(model, batch)
        return model(**bind_slots(batch, slot_input_of(model))).loss

    def evaluation_model(self, model, core):
        return core  # generate() is the unwrapped model's

    def evaluate(
        self, model, split: Split, desc: str, limit: int | None = None, zero_shot: bool = False, show: bool = False
    ) -> float:
        import torch

        from pstar_plugins.mechanisms import distributed
        from pstar_plugins.tasks import generation as gen

        groups = split.groups[: limit or len(split.groups)]
        template = self.zero_shot_template if zero_shot else self.template
        step = self.args.eval_batch_size
        # each rank decodes its round-robin share of the batches one process would decode (the
        # same batches, so the same text), the continuations are gathered and scored together
        # (BLEU is a corpus score); under ZeRO-3 every decoding step is a collective, so ranks
        # with shorter outputs or no batch left keep stepping (synced_gpus, a padding batch)
        synced = distributed.any_partitioned(model)
        mine = distributed.share_of_this_rank(list(range(0, len(groups), step)))
        model.eval()
        decoded = {}
        with torch.no_grad():
            for i in mine:
                batch = groups[0:1] if i is None else groups[i : i + step]
                hyps = gen.generate(
                    model,
                    template,
                    self.tokenizer,
                    [g[0] for g in batch],
                    self.args.max_new_tokens,
                    step,
                    synced_gpus=synced,
                )
                if i is not None:
                    decoded[i] = hyps
        model.train()
        merged = {i: h for part in distributed.all_ranks(decoded) for i, h in part.items()}
        hyps = [h for i in sorted(merged) for h in merged[i]]
        scores = gen.bleu_rouge(hyps, [g[1] for g in groups])
        self.scores[desc] = {**scores, "sources": len(groups), "example": hyps[:3]}
        return scores["bleu"]

    @staticmethod
    def summary_lines(results: dict) -> list[str]:
        lines = []
        scores = results.get("generation_scores", {})
        for label, key in (("zero-shot", "zero-shot eval"), ("tuned", "final eval")):
            if key in scores:
                lines.append(
                    f"  {label + ' dev':<15}: BLEU {scores[key]['bleu']:.2f}, ROUGE-L {scores[key]['rouge_l']:.2f} "
                    "(both 0-100)"
                )
        sample = scores.get("final eval", {}).get("example") or []
        if sample:
            lines.append(f"  sample output          : {sample[0]!r}")
        return lines


TASKS = {t.kind: t for t in (ClassificationTask, GenerationTask)}
BY_METRIC = {t.metric_name: t for t in (ClassificationTask, GenerationTask)}


#: what the training loop calls on a task
ScriptTask = ClassificationTask | GenerationTask


def make_task(args) -> ScriptTask:
    return TASKS[args.task](args)

"""Model selection on a split carved out of the training data (``--select-best``,
``--early-stopping-patience``).

The evaluation file is what a run reports; choosing the step on it as well would report a number
tuned on the rows it is measured on. The selection split is taken from the training rows
instead (``--validation-split-percentage``, as in transformers' ``run_glue_no_trainer.py``), the
best trainable state on it is kept, and the evaluation file scores that state once, at the end
(issue 18).
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

BEST_ADAPTER = "best-adapter"  # inside a checkpoint folder: the best state so far, as an adapter


def split_off(rows: list, percentage: int, seed: int, key=None) -> tuple[list, list]:
    """``(training rows, selection rows)``: ``percentage``% of ``rows``, drawn with ``seed``,
    become the selection split; both keep the file's order. Deterministic for a seed.

    ``key(row)``: rows with the same key go to the same side, and ``percentage``% of the keys are
    held out (generation: a source's references must not be trained on while it selects)."""
    if key is None:
        order = list(range(len(rows)))
        random.Random(seed).shuffle(order)
        held = set(order[: len(order) * percentage // 100])
    else:
        groups: dict = {}
        for i, row in enumerate(rows):
            groups.setdefault(key(row), []).append(i)
        keys = list(groups)
        random.Random(seed).shuffle(keys)
        held = {i for k in keys[: len(keys) * percentage // 100] for i in groups[k]}
    return [r for i, r in enumerate(rows) if i not in held], [r for i, r in enumerate(rows) if i in held]


@dataclass
class Selection:
    """What the selection evaluations have seen: the best value, its step and state, the last
    value, and how many evaluations in a row did not improve on the best (for the patience).
    ``state`` is the trainable state at the best step (full CPU tensors, on every rank)."""

    keep_best: bool
    patience: int = 0
    best_value: float | None = None
    best_step: int | None = None
    last_value: float | None = None
    last_step: int | None = None
    without_improvement: int = 0
    state: dict | None = field(default=None, repr=False)

    def record(self, step: int, value: float, current_state) -> bool:
        """Record an evaluation at ``step``; ``current_state()`` is called (on every rank: it may
        be a collective) only when the value improves on the best. True when it did."""
        self.last_value, self.last_step = value, step
        if self.best_value is not None and value <= self.best_value:
            self.without_improvement += 1
            return False
        self.best_value, self.best_step, self.without_improvement = value, step, 0
        if self.keep_best:
            self.state = {k: v.clone() for k, v in current_state().items()}
        return True

    @property
    def should_stop(self) -> bool:
        return bool(self.patience) and self.without_improvement >= self.patience

    def to_json(self) -> dict[str, Any]:
        return {
            "best_value": self.best_value,
            "best_step": self.best_step,
            "last_value": self.last_value,
            "last_step": self.last_step,
            "without_improvement": self.without_improvement,
        }

    def restore(self, saved: dict[str, Any], checkpoint: Path) -> None:
        """Continue from a checkpoint's record (and its best state, when one is kept)."""
        for key in ("best_value", "best_step", "last_value", "last_step", "without_improvement"):
            setattr(self, key, saved[key])
        if self.keep_best and self.best_step is not None:
            from pstar_plugins.mechanisms.adapter_io import read_adapter

            self.state = read_adapter(checkpoint / BEST_ADAPTER)[1]

    def report(self, metric: str, rows: int) -> dict[str, Any]:
        """The ``selection`` entry of metrics.json."""
        return {
            "metric": metric,
            "rows": rows,
            "select": "best" if self.keep_best else "last",
            "best_step": self.best_step,
            f"best_{metric}": self.best_value,
            "last_step": self.last_step,
            f"last_{metric}": self.last_value,
            "evaluations_without_improvement": self.without_improvement,
        }

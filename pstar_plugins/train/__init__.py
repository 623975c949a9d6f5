"""``pstar train`` (``accelerate launch -m pstar_plugins.train``): train a P*-tuning method on a
frozen model with Accelerate.

    accelerate launch -m pstar_plugins.train --method prompt-tuning \\
        --model smollm2 --output-dir runs/sst2-prompt

Defaults train on the packaged SST-2 sample and evaluate on SST-2 dev, offline. Method options
are flags too (``--num-virtual-tokens 20``); ``pstar methods`` lists methods, ``--help`` after
``--method NAME`` lists that method's options.

A run reads in the order of its modules:

- :mod:`~pstar_plugins.train.cli` and :mod:`~pstar_plugins.train.checks` — the flags and their
  checks (no torch: ``--help`` and bad values answer at once);
- :mod:`~pstar_plugins.train.data` — the rows and the template, read and checked;
- :mod:`~pstar_plugins.train.plan` — :class:`~pstar_plugins.train.plan.Plan`, everything resolved
  before any model loads;
- :mod:`~pstar_plugins.train.loop` — :func:`~pstar_plugins.train.loop.train`: set up → build →
  prepare → loop → finish;
- :mod:`~pstar_plugins.train.report` — the start lines, the summary and the plot;

with what differs between classification and generation in :mod:`~pstar_plugins.train.tasks`,
the output folder in :mod:`~pstar_plugins.train.run_dir`, model selection in
:mod:`~pstar_plugins.train.selection`, size checks in :mod:`~pstar_plugins.train.sizes` and
``--report-to`` in :mod:`~pstar_plugins.train.tracking`.
"""

from __future__ import annotations


def main(argv: list[str] | None = None, prog: str = "python -m pstar_plugins.train") -> int:
    """Parse ``argv``, check it, and train; errors are reported as one line (exit status 2)."""
    from pstar_plugins.contract.errors import run_reporting_errors

    return run_reporting_errors(_main, argv, prog)


def _main(argv: list[str] | None, prog: str = "pstar train") -> int:
    # the flags and the plan are checked before torch is imported: --help and bad values answer at once
    from pstar_plugins.train import run_dir
    from pstar_plugins.train.cli import parse_args
    from pstar_plugins.train.plan import make_plan

    plan = make_plan(parse_args(argv, prog))
    with run_dir.claimed(plan.out_dir, plan.run_id, plan.args, resuming=plan.resume is not None):
        from pstar_plugins.train.loop import train

        return train(plan)

"""The checks of ``pstar train``'s flags and the schedule they resolve to: what cannot train what
was asked is refused before any model loads or anything is written.

Nothing here imports torch or transformers.
"""

from __future__ import annotations

import math

from pstar_plugins import arguments
from pstar_plugins.contract.errors import ConfigError
from pstar_plugins.models import check_attn_implementation, check_quantization
from pstar_plugins.train import tracking


def check_args(args) -> None:
    """Refuse values that cannot train what was asked, before anything is loaded or written."""
    a = arguments
    tracking.selected(args)  # --report-to: a tracker that is not installed, or 'none' with others
    if args.learning_rate is not None:
        a.positive_float("--learning-rate", args.learning_rate)
    a.non_negative_float("--weight-decay", args.weight_decay)
    a.non_negative_float("--max-grad-norm", args.max_grad_norm)
    for name in (
        "batch_size",
        "eval_batch_size",
        "max_length",
        "eval_subset_size",
        "max_new_tokens",
        "dist_timeout",
        "logging_steps",
    ):
        a.positive_int(a.flag_of(name), getattr(args, name))
    _check_schedule_args(args)
    for name in (
        "eval_steps",
        "checkpointing_steps",
        "checkpoints_total_limit",
        "stop_after_steps",
        "early_stopping_patience",
    ):
        a.non_negative_int(a.flag_of(name), getattr(args, name))
    for name in ("max_train_samples", "max_eval_samples"):
        if getattr(args, name) is not None:
            a.positive_int(a.flag_of(name), getattr(args, name))
    _check_selection_args(args)
    check_attn_implementation(args.attn_implementation, training=True)
    check_quantization(args)
    if args.task == "classification":
        a.check_label_words(args.label_words)
    if args.task == "generation" and args.model_kind == "masked-lm":
        raise ConfigError(
            "--task generation decodes text with a causal LM, which --model-kind masked-lm is not; "
            "use --model-kind causal-lm with a decoder model, or --task classification."
        )


def _check_schedule_args(args) -> None:
    """--max-steps or --num-train-epochs, --warmup-steps or --warmup-ratio (the steps of an
    epoch-counted run are known once the data is read: :func:`resolve_schedule`)."""
    if args.max_steps is not None and args.num_train_epochs is not None:
        raise ConfigError(
            f"--max-steps {args.max_steps} and --num-train-epochs {args.num_train_epochs:g} both set the "
            "length of the run; keep one of them."
        )
    if args.warmup_steps is not None and args.warmup_ratio is not None:
        raise ConfigError(
            f"--warmup-steps {args.warmup_steps} and --warmup-ratio {args.warmup_ratio:g} both set the "
            "warm-up; keep one of them."
        )
    if args.max_steps is not None and args.max_steps < 1:
        raise ConfigError(
            f"--max-steps {args.max_steps}: expected a positive integer (0 would save an untrained adapter); "
            "pass --max-steps 1 or more."
        )
    if args.num_train_epochs is not None and not (math.isfinite(args.num_train_epochs) and args.num_train_epochs > 0):
        raise ConfigError(
            f"--num-train-epochs {args.num_train_epochs:g}: expected a finite number above 0 (0.5 is half an epoch)."
        )
    if args.warmup_ratio is not None and not 0 <= args.warmup_ratio <= 1:
        raise ConfigError(f"--warmup-ratio {args.warmup_ratio:g}: expected a fraction of the run's steps from 0 to 1.")
    if args.warmup_steps is not None:
        arguments.non_negative_int("--warmup-steps", args.warmup_steps)
    if args.num_train_epochs is None:
        resolve_schedule(args, None, 1)


def resolve_schedule(args, train_rows: int | None, processes: int) -> None:
    """Set ``args.max_steps`` and ``args.warmup_steps`` from the flags that give them (an epoch
    is ``ceil(train_rows / (batch size x processes))`` steps) and refuse a warm-up past the end."""
    if args.num_train_epochs is not None:
        per_epoch = math.ceil(train_rows / (args.batch_size * processes))
        args.max_steps = max(1, math.ceil(per_epoch * args.num_train_epochs))
    elif args.max_steps is None:
        args.max_steps = 100
    if args.warmup_ratio is not None:
        args.warmup_steps = math.ceil(args.warmup_ratio * args.max_steps)
    elif args.warmup_steps is None:
        args.warmup_steps = min(10, args.max_steps)
    if args.warmup_steps > args.max_steps:
        raise ConfigError(
            f"--warmup-steps {args.warmup_steps} is more than --max-steps {args.max_steps}, so the learning "
            f"rate would never reach its value; pass --warmup-steps {min(10, args.max_steps)} or fewer."
        )


def check_batch_fits(
    train_rows: int, batch_size: int, processes: int, limits: tuple[tuple[str, str | None], ...] = ()
) -> None:
    """Refuse a training split smaller than one step's rows (``batch_size`` on each of
    ``processes`` ranks): a rank would get a short or empty batch, and the examples a run
    reports (steps x batch size x processes) would count rows it never saw. ``limits``
    (:func:`data_limits`): the flags that left the split smaller than its data, each with the
    change that gives it more rows, or ``None`` where no change of that flag is enough."""
    if train_rows >= batch_size * processes:
        return
    each = (
        f"--batch-size {batch_size} on each of {processes} processes" if processes > 1 else f"--batch-size {batch_size}"
    )
    fix = (
        f"pass --batch-size {train_rows // processes} or fewer"
        if train_rows >= processes
        else f"launch at most {train_rows} processes with --batch-size 1"
    )
    after = f" (what {' and '.join(flag for flag, _ in limits)} left)" if limits else ""
    ways = [way for _, way in limits if way]
    rows = f"train on more rows ({' or '.join(ways)})" if ways else "train on more rows"
    raise ConfigError(
        f"the training split has {train_rows} rows{after}, fewer than the {batch_size * processes} one step "
        f"takes ({each}); {fix}, or {rows}."
    )


def data_limits(args, rows_read: int, available: int | None, needed: int) -> tuple[tuple[str, str | None], ...]:
    """The flags that left fewer training rows than the data holds, for :func:`check_batch_fits`,
    each with the change that could fill the ``needed`` rows of one step, or ``None`` where no
    change of that flag can: ``--max-train-samples`` when it cut rows (``available``: the rows the
    data holds without it, ``None`` when unknown), ``--validation-split-percentage`` when set
    (``rows_read``: the rows before it held some out; any percentage holds out at least one row,
    and at least 1% of them)."""
    percentage = args.validation_split_percentage

    def most_trained(rows: int) -> int:  # the most rows a split of ``rows`` can leave to train on
        return rows if percentage is None else rows - max(1, rows // 100)

    limits = []
    if available is None or available > rows_read:  # the flag cut rows (or may have)
        if args.max_train_samples is not None:
            enough = available is None or most_trained(available) >= needed
            limits.append(
                (f"--max-train-samples {args.max_train_samples}", "a larger --max-train-samples" if enough else None)
            )
    if percentage is not None:
        limits.append(
            (
                f"--validation-split-percentage {percentage}",
                "a smaller --validation-split-percentage" if most_trained(rows_read) >= needed else None,
            )
        )
    return tuple(limits)


def _check_selection_args(args) -> None:
    """--select-best best and --early-stopping-patience choose on a selection split, evaluated
    every --eval-steps: refuse them without one, before anything is read."""
    percentage = args.validation_split_percentage
    if percentage is not None and not 0 < percentage < 100:
        raise ConfigError(f"--validation-split-percentage {percentage}: expected 1 to 99.")
    wanted = [
        f
        for f, on in (
            ("--select-best best", args.select_best == "best"),
            (f"--early-stopping-patience {args.early_stopping_patience}", args.early_stopping_patience),
        )
        if on
    ]
    if wanted and percentage is None:
        raise ConfigError(
            f"{' and '.join(wanted)} choose on a selection split carved out of the training rows; pass "
            "--validation-split-percentage 10 (the evaluation file stays for the final score)."
        )
    if wanted and not args.eval_steps:
        raise ConfigError(
            f"{' and '.join(wanted)} with --eval-steps 0 would never evaluate on the selection split; "
            "pass --eval-steps 25 (or another positive number)."
        )
    if percentage is not None and not args.eval_steps and (args.validation_file or args.dataset):
        raise ConfigError(
            f"--validation-split-percentage {percentage} with --eval-steps 0 would hold out training rows "
            "that are never evaluated; pass --eval-steps 25 to watch the run on them, or drop "
            "--validation-split-percentage."
        )

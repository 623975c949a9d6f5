"""Train a P*-tuning method on a frozen model with Accelerate.

    accelerate launch -m pstar_plugins.train --method prompt-tuning \\
        --model smollm2 --output-dir runs/sst2-prompt

Defaults train on the packaged SST-2 sample and evaluate on SST-2 dev, offline. Method options
are flags too (``--num-virtual-tokens 20``); ``pstar methods`` lists methods, ``--help`` after
``--method NAME`` lists that method's options.

The run is a few named steps, in the shape of transformers' ``run_glue_no_trainer.py`` and
nanoGPT's ``train.py``: :func:`_plan` (method, config and preset, data with the selection split,
schedule, template; everything checked before torch is imported), :func:`_accelerator`,
:func:`_build_or_continue` (a new method, or ``--init-from-adapter`` through ``load_adapter``),
:func:`_optimizer_and_schedule` (``make_optimizer`` and transformers' ``get_scheduler``),
:func:`_start` (zero-shot baseline, resume), :func:`_training_loop` and :func:`_finish` (final
evaluation, adapter, metrics, plot, summary). What differs between classification and generation
is the task's (:mod:`pstar_plugins.script_tasks`).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import os
import random
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pstar_plugins import arguments, tracking
from pstar_plugins.models import add_loading_arguments, check_attn_implementation, check_quantization
from pstar_plugins.errors import ConfigError, PStarError, run_reporting_errors
from pstar_plugins.tasks.template import DEFAULT_TEMPLATE

logger = logging.getLogger("pstar_plugins.train")

LR_SCHEDULES = {"linear": "linear decay to 0", "cosine": "half-cosine decay to 0", "constant_with_warmup": "constant"}



def _add_model_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="smollm2", help="offline alias (smollm2, minilm), a local folder, or any hub model id")
    parser.add_argument("--gguf-file", default=None, help="GGUF file inside --model's folder, if the weights are GGUF")
    parser.add_argument("--model-kind", default="causal-lm", choices=["causal-lm", "masked-lm"], help="which head to load")
    add_loading_arguments(parser)


def _add_data_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--train-file", default=None,
                        help="training data (.csv, .tsv, .jsonl); with neither it nor --dataset: the packaged SST-2 sample")
    parser.add_argument("--validation-file", default=None,
                        help="evaluation data (.csv, .tsv, .jsonl); without --train-file: the packaged SST-2 dev set; "
                             "with --train-file: required, unless --validation-split-percentage splits one off")
    parser.add_argument("--validation-split-percentage", type=int, default=None, metavar="P",
                        help="hold P%% of the training rows out (seeded by --seed; the rest trains) as the selection split: the "
                             "periodic evaluations and --select-best use it, the final evaluation uses --validation-file "
                             "(without one, the held-out rows are the evaluation set)")
    parser.add_argument("--dataset", default=None,
                        help="a Hugging Face datasets id or local dataset folder to use instead of --train-file/--validation-file")
    parser.add_argument("--dataset-config", default=None, help="the dataset's configuration (e.g. sst2 for glue)")
    parser.add_argument("--train-split", default="train", help="--dataset split to train on")
    parser.add_argument("--validation-split", default="validation", help="--dataset split to evaluate on")
    parser.add_argument("--column", action="append", default=[], metavar="DATA_COLUMN=NAME",
                        help="rename a data column to the name the template or --label-column uses (repeatable)")
    parser.add_argument("--max-train-samples", type=int, default=None, metavar="N", help="use only the first N training rows")
    parser.add_argument("--max-eval-samples", type=int, default=None, metavar="N", help="use only the first N evaluation rows")


def _add_task_arguments(parser: argparse.ArgumentParser, built_from_columns: bool) -> None:
    if built_from_columns:
        default = "'{soft:3} {column} ... {soft:3}{answer}' built from the data's text columns"
    else:
        default = f"{DEFAULT_TEMPLATE!r}, its slot renamed to the data's one text column".replace("%", "%%")
    parser.add_argument("--template", default=None,
                        help=f"template with {{column}} slots and one {{answer}} slot at the end; \\n is a newline (default: {default})")
    parser.add_argument("--task", default="classification", choices=["classification", "generation"],
                        help="classification (label words or a linear head) or generation (loss on the target tokens only)")
    parser.add_argument("--target-column", default="ref", help="generation: the column with the target text")
    parser.add_argument("--max-new-tokens", type=int, default=64, metavar="N", help="generation: tokens to decode in evaluation")
    parser.add_argument("--label-column", default="label", help="column with the class (index or label word)")
    parser.add_argument("--label-words", nargs="+", default=["negative", "positive"], metavar="WORD",
                        help="one word per class, in class order")


def _add_training_arguments(parser: argparse.ArgumentParser, preset_lr: float | None) -> None:
    lr_default = f"{preset_lr:g}, this method's preset" if preset_lr is not None else "the method's preset; see --method NAME --help"
    parser.add_argument("--output-dir", required=True, help="where the adapter, checkpoints, metrics and plot go")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace the run in --output-dir (a finished or a different one), its checkpoints included")
    parser.add_argument("--learning-rate", type=float, default=None, metavar="LR", help=f"base learning rate (default: {lr_default})")
    parser.add_argument("--weight-decay", type=float, default=0.0, help="weight decay of the non-embedding groups")
    parser.add_argument("--max-grad-norm", type=float, default=1.0,
                        help="clip the global gradient norm (0: no clipping); DeepSpeed gets the same value")
    parser.add_argument("--batch-size", type=int, default=16, metavar="N", help="per-process training batch size")
    parser.add_argument("--eval-batch-size", type=int, default=32, metavar="N", help="per-process evaluation batch size")
    parser.add_argument("--max-steps", type=int, default=None, metavar="N", help="optimizer steps (default: 100)")
    parser.add_argument("--num-train-epochs", type=float, default=None, metavar="E",
                        help="train for E passes over the training rows instead of --max-steps: "
                             "ceil(rows / (batch size x processes)) x E steps, rounded up")
    parser.add_argument("--warmup-steps", type=int, default=None, metavar="N",
                        help="linear warm-up steps, at most the run's steps (default: 10, or the steps when those are fewer)")
    parser.add_argument("--warmup-ratio", type=float, default=None, metavar="R",
                        help="warm up for this fraction (0-1) of the run's steps, rounded up, instead of --warmup-steps")
    parser.add_argument("--lr-scheduler-type", default="linear", choices=list(LR_SCHEDULES),
                        help="learning-rate schedule after the warm-up (transformers' schedules): " + "; ".join(f"{k}: {v}" for k, v in LR_SCHEDULES.items()))
    parser.add_argument("--max-length", type=int, default=128, metavar="N", help="truncate examples to this many tokens")
    parser.add_argument("--eval-steps", type=int, default=25, metavar="N", help="evaluate every N steps (0: only at the end)")
    parser.add_argument("--eval-subset-size", type=int, default=128, metavar="N",
                        help="without a selection split, periodic evaluations use the first N evaluation rows (the final one uses all)")
    parser.add_argument("--select-best", default="last", choices=["last", "best"],
                        help="the adapter a run saves: the last step's (last), or the one that scored best on the selection "
                             "split at the periodic evaluations (best; needs --validation-split-percentage)")
    parser.add_argument("--early-stopping-patience", type=int, default=0, metavar="N",
                        help="stop after N selection evaluations in a row without improvement (0: never; needs "
                             "--validation-split-percentage)")
    parser.add_argument("--checkpointing-steps", type=int, default=0, metavar="N",
                        help="save the full training state every N steps (0: never)")
    parser.add_argument("--checkpoints-total-limit", type=int, default=0, metavar="N",
                        help="keep only the newest N complete checkpoints (0: keep all)")
    parser.add_argument("--resume-from-checkpoint", default=None, metavar="PATH|latest|latest-if-any",
                        help="checkpoint folder to resume from; 'latest' (the newest complete one in --output-dir) or "
                             "'latest-if-any' (the same, or a fresh start when there is none: for preemptible jobs)")
    parser.add_argument("--init-from-adapter", default=None, metavar="DIR",
                        help="continue training a saved adapter (its method and options are used; a folded one keeps training folded)")
    parser.add_argument("--stop-after-steps", type=int, default=0, metavar="N",
                        help="leave after this many steps in this invocation, with a checkpoint (time-limited jobs); 0: run to --max-steps")
    parser.add_argument("--gradient-checkpointing", action="store_true", help="checkpoint the frozen model's layers to save memory")
    parser.add_argument("--packing", action=argparse.BooleanOptionalAction, default=True,
                        help="run the frozen decoder-only model on real tokens only, rows packed padding-free (same loss; see docs/design.md)")
    parser.add_argument("--seed", type=int, default=42, help="random seed")
    parser.add_argument("--dist-timeout", type=int, default=600, metavar="SECONDS",
                        help="seconds a collective may wait for a missing rank before the run fails (instead of hanging)")
    parser.add_argument("--no-zero-shot", action="store_true", help="skip the zero-shot baseline evaluation")
    parser.add_argument("--plot", default="training.png", help="file name (in --output-dir) of the loss/accuracy plot; '' for none")
    parser.add_argument("--logging-steps", type=int, default=10, metavar="N",
                        help="when stderr is not a terminal (a log file), log one line every N steps instead of a progress bar")
    tracking.add_arguments(parser)  # --report-to


def build_parser(method_names, method: str | None = None, prog: str = "pstar train") -> arguments.StrictParser:
    """The training script's own flags (``method_names``: the registered methods, for the help).
    With a known ``method`` the defaults shown are the ones that method's run uses."""
    from pstar_plugins.plugins import get_plugin_manager

    preset = get_plugin_manager().method(method).preset if method else None
    parser = arguments.StrictParser(
        prog=prog, description="Train a P*-tuning method on a frozen model with Accelerate.",
        epilog="Each method has options of its own: pstar train --method NAME --help lists them, "
               "pstar methods --verbose lists every method's.")
    parser.add_argument("--method", required=True, help=f"method name; one of: {', '.join(sorted(method_names))}")
    arguments.add_plugin_argument(parser)
    _add_model_arguments(parser)
    _add_data_arguments(parser)
    config_fields = {f.name for f in dataclasses.fields(get_plugin_manager().method(method).config_class)} if method else set()
    _add_task_arguments(parser, "template" in config_fields)
    _add_training_arguments(parser, preset.learning_rate if preset else None)
    return parser


def _pre_parse(argv: list[str] | None):
    """``--method`` and ``-p`` first: they decide which method flags exist."""
    pre = arguments.StrictParser(add_help=False)
    pre.add_argument("--method")
    pre.add_argument("-p", "--plugin", action="append", default=[])
    known, _ = pre.parse_known_args(argv)
    return known


def parse_args(argv: list[str] | None = None, prog: str = "pstar train"):
    from pstar_plugins.plugins import get_plugin_manager

    known = _pre_parse(argv)
    arguments.load_plugins(known.plugin)
    pm = get_plugin_manager()
    method = known.method if known.method in pm.methods else None
    parser = build_parser(pm.methods, method, prog)
    for spec in pm.methods.values():  # every config field of every method must be settable from here
        arguments.check_method_fields(spec.config_class, spec.name, spec.plugin, set(parser.option_strings()))
    option_names = []
    if method:
        spec = pm.method(method)
        option_names = arguments.add_method_arguments(parser, spec.config_class, method, spec.preset.options)
    args = parser.parse_args(argv)
    args.method_options = {n: getattr(args, f"m_{n}") for n in option_names if hasattr(args, f"m_{n}")}
    if args.template is not None:  # converted once: the method config and the task record hold the same text
        from pstar_plugins.tasks.template import from_command_line

        args.template = from_command_line(args.template)
    check_args(args)
    return args


def check_args(args) -> None:
    """Refuse values that cannot train what was asked, before anything is loaded or written."""
    a = arguments
    tracking.selected(args)  # --report-to: a tracker that is not installed, or 'none' with others
    if args.learning_rate is not None:
        a.positive_float("--learning-rate", args.learning_rate)
    a.non_negative_float("--weight-decay", args.weight_decay)
    a.non_negative_float("--max-grad-norm", args.max_grad_norm)
    for name in ("batch_size", "eval_batch_size", "max_length", "eval_subset_size", "max_new_tokens", "dist_timeout", "logging_steps"):
        a.positive_int(a.flag_of(name), getattr(args, name))
    _check_schedule_args(args)
    for name in ("eval_steps", "checkpointing_steps", "checkpoints_total_limit", "stop_after_steps", "early_stopping_patience"):
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
        raise ConfigError("--task generation decodes text with a causal LM, which --model-kind masked-lm is not; "
                          "use --model-kind causal-lm with a decoder model, or --task classification.")


def _check_schedule_args(args) -> None:
    """--max-steps or --num-train-epochs, --warmup-steps or --warmup-ratio (the steps of an
    epoch-counted run are known once the data is read: :func:`resolve_schedule`)."""
    if args.max_steps is not None and args.num_train_epochs is not None:
        raise ConfigError(f"--max-steps {args.max_steps} and --num-train-epochs {args.num_train_epochs:g} both set the "
                          "length of the run; keep one of them.")
    if args.warmup_steps is not None and args.warmup_ratio is not None:
        raise ConfigError(f"--warmup-steps {args.warmup_steps} and --warmup-ratio {args.warmup_ratio:g} both set the "
                          "warm-up; keep one of them.")
    if args.max_steps is not None and args.max_steps < 1:
        raise ConfigError(f"--max-steps {args.max_steps}: expected a positive integer (0 would save an untrained adapter); "
                          "pass --max-steps 1 or more.")
    if args.num_train_epochs is not None and not (math.isfinite(args.num_train_epochs) and args.num_train_epochs > 0):
        raise ConfigError(f"--num-train-epochs {args.num_train_epochs:g}: expected a finite number above 0 (0.5 is half an epoch).")
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
        raise ConfigError(f"--warmup-steps {args.warmup_steps} is more than --max-steps {args.max_steps}, so the learning "
                          f"rate would never reach its value; pass --warmup-steps {min(10, args.max_steps)} or fewer.")


def check_batch_fits(train_rows: int, batch_size: int, processes: int, limits: tuple[tuple[str, str | None], ...] = ()) -> None:
    """Refuse a training split smaller than one step's rows (``batch_size`` on each of
    ``processes`` ranks): a rank would get a short or empty batch, and the examples a run
    reports (steps x batch size x processes) would count rows it never saw. ``limits``
    (:func:`data_limits`): the flags that left the split smaller than its data, each with the
    change that gives it more rows, or ``None`` where no change of that flag is enough."""
    if train_rows >= batch_size * processes:
        return
    each = f"--batch-size {batch_size} on each of {processes} processes" if processes > 1 else f"--batch-size {batch_size}"
    fix = (f"pass --batch-size {train_rows // processes} or fewer" if train_rows >= processes
           else f"launch at most {train_rows} processes with --batch-size 1")
    after = f" (what {' and '.join(flag for flag, _ in limits)} left)" if limits else ""
    ways = [way for _, way in limits if way]
    rows = f"train on more rows ({' or '.join(ways)})" if ways else "train on more rows"
    raise ConfigError(f"the training split has {train_rows} rows{after}, fewer than the {batch_size * processes} one step "
                      f"takes ({each}); {fix}, or {rows}.")


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
            limits.append((f"--max-train-samples {args.max_train_samples}", "a larger --max-train-samples" if enough else None))
    if percentage is not None:
        limits.append((f"--validation-split-percentage {percentage}",
                       "a smaller --validation-split-percentage" if most_trained(rows_read) >= needed else None))
    return tuple(limits)


def _rows_without_limit(args) -> int | None:
    """The training rows the data holds without ``--max-train-samples``, read only to word a
    refusal's advice; ``None`` when they cannot be read (a bad row past the limit is no fault of
    the run, which never reads it)."""
    from pstar_plugins.errors import DataError
    from pstar_plugins.tasks.data import load_split

    try:
        return len(load_split(_train_file(args), args.dataset, args.dataset_config, args.train_split, None, {})[0])
    except DataError:
        return None


def _check_selection_args(args) -> None:
    """--select-best best and --early-stopping-patience choose on a selection split, evaluated
    every --eval-steps: refuse them without one, before anything is read."""
    percentage = args.validation_split_percentage
    if percentage is not None and not 0 < percentage < 100:
        raise ConfigError(f"--validation-split-percentage {percentage}: expected 1 to 99.")
    wanted = [f for f, on in (("--select-best best", args.select_best == "best"),
                              (f"--early-stopping-patience {args.early_stopping_patience}", args.early_stopping_patience)) if on]
    if wanted and percentage is None:
        raise ConfigError(f"{' and '.join(wanted)} choose on a selection split carved out of the training rows; pass "
                          "--validation-split-percentage 10 (the evaluation file stays for the final score).")
    if wanted and not args.eval_steps:
        raise ConfigError(f"{' and '.join(wanted)} with --eval-steps 0 would never evaluate on the selection split; "
                          "pass --eval-steps 25 (or another positive number).")
    if percentage is not None and not args.eval_steps and (args.validation_file or args.dataset):
        raise ConfigError(f"--validation-split-percentage {percentage} with --eval-steps 0 would hold out training rows "
                          "that are never evaluated; pass --eval-steps 25 to watch the run on them, or drop "
                          "--validation-split-percentage.")


def main(argv: list[str] | None = None, prog: str = "python -m pstar_plugins.train") -> int:
    return run_reporting_errors(_main, argv, prog)


def _train_file(args) -> str | None:
    """The training file a run reads: none with --dataset, the packaged SST-2 sample without --train-file."""
    from pstar_plugins.models import packaged_data

    if args.dataset:
        return None
    return args.train_file if args.train_file is not None else packaged_data("sst2_train_sample.tsv")


def _data(args):
    """Training and evaluation rows with their names for messages. The packaged SST-2 files are
    the default only when no data at all is given; a --train-file needs its own evaluation rows.
    The last value is the number of training rows read, before a selection split is held out."""
    from pstar_plugins.models import packaged_data
    from pstar_plugins.tasks.data import load_split, parse_column_mapping

    columns = parse_column_mapping(args.column)
    if args.dataset:
        if args.train_file or args.validation_file:
            raise ConfigError("--dataset and --train-file/--validation-file both name the data; keep one of them.")
        validation_file = None
    elif args.train_file is None:
        if args.validation_file is not None:
            raise ConfigError(f"--validation-file {args.validation_file} without --train-file would train on the packaged "
                              "SST-2 sample; pass --train-file too.")
        validation_file = packaged_data("sst2_dev.tsv")
    else:
        validation_file = args.validation_file
        if validation_file is None and args.validation_split_percentage is None:
            raise ConfigError(f"--train-file {args.train_file} without --validation-file: pass --validation-file, or "
                              "--validation-split-percentage 10 to evaluate on 10% of the training rows (trained on the rest).")
    train_file = _train_file(args)
    percentage = args.validation_split_percentage
    # --max-train-samples first: the selection split is P% of the rows the run reads
    train_rows, train_source = load_split(train_file, args.dataset, args.dataset_config, args.train_split,
                                          args.max_train_samples, columns)
    rows_read = len(train_rows)
    select_rows = select_source = None
    if percentage is not None:
        train_rows, select_rows = _split_off(train_rows, train_source, args)
        select_source = f"{train_source} (held-out {percentage}%, seed {args.seed})"
    if percentage is not None and validation_file is None and not args.dataset:
        # no evaluation file: the held-out rows are the evaluation set (and no selection split)
        if args.select_best == "best" or args.early_stopping_patience:
            raise ConfigError(f"--train-file {args.train_file} without --validation-file: the held-out rows are the "
                              "evaluation set, so choosing the step on them would report a score tuned on its own rows; "
                              "pass a --validation-file for the final evaluation.")
        eval_rows, eval_source = select_rows[: args.max_eval_samples], select_source
        select_rows = select_source = None
        logger.info("evaluating on %d rows held out of %s (--validation-split-percentage %d)", len(eval_rows), train_source,
                    percentage)
    else:
        eval_rows, eval_source = load_split(validation_file, args.dataset, args.dataset_config, args.validation_split,
                                            args.max_eval_samples, columns)
    if select_rows is not None:
        logger.info("selection split: %d rows held out of %s (--validation-split-percentage %d), %d rows train",
                    len(select_rows), train_source, percentage, len(train_rows))
    return train_rows, train_source, eval_rows, eval_source, select_rows, rows_read


def _split_off(rows: list, source: str, args) -> tuple[list, list]:
    """``(training rows, held-out rows)`` of ``--validation-split-percentage`` (below 100%, so
    rows always remain to train on); refuses a split that holds out no row."""
    from pstar_plugins.selection import split_off

    percentage = args.validation_split_percentage
    key = None
    if args.task == "generation":  # rows of one source (its fields but the target) stay on one side
        target = args.target_column
        key = lambda row: tuple(sorted((k, str(v)) for k, v in row.items() if k != target))  # noqa: E731
    train, held = split_off(rows, percentage, args.seed, key=key)
    if not held:
        raise ConfigError(f"--validation-split-percentage {percentage} of the {len(rows)} rows of {source} holds out no row; "
                          f"pass a percentage of at least {math.ceil(100 / len(rows))} or more training rows.")
    return train, held


def _method_config(args, spec):
    """The method's config: its preset, the method flags, the shared task flags, or a saved adapter's."""
    preset = spec.preset.options
    fields = {f.name for f in dataclasses.fields(spec.config_class)}
    options = {k: v for k, v in preset.items() if k in fields}
    options.update(args.method_options)
    if "label_words" in fields:  # arguments.SHARED_TASK_FLAGS: the task's flags fill these fields
        options["label_words"] = args.label_words
    if "template" in fields and args.template:
        options["template"] = args.template
    adapter = None
    if args.init_from_adapter:
        from pstar_plugins.core.adapter_io import read_adapter
        from pstar_plugins.plugins import get_plugin_manager

        adapter = read_adapter(args.init_from_adapter)
        meta = adapter[0]
        get_plugin_manager().adapter_method(meta, args.init_from_adapter)  # known before "pass --method" is advised
        if meta["method"] != args.method:
            raise ConfigError(f"--init-from-adapter {args.init_from_adapter} holds a {meta['method']!r} adapter, "
                              f"but --method is {args.method!r}; pass --method {meta['method']}.")
        if args.method_options:
            raise ConfigError(f"--init-from-adapter takes the method options from the adapter; drop {sorted(args.method_options)}.")
        return spec.config_class.from_saved(meta["method_config"]), adapter  # validated before anything is loaded
    return spec.config_class.from_dict(options), adapter  # validated before anything is loaded or written


def _template_text(args, config, train_rows: list[dict], train_source: str):
    """``(template text, config)``. One template, converted from the command line once
    (parse_args): a template method's config holds the same text as the task record, so
    ``pstar eval`` scores the prompt training used. Without ``--template``, a template method's
    comes from the data's text columns and the others' default follows the data's one text column
    (:mod:`pstar_plugins.data_templates`)."""
    from pstar_plugins.data_templates import soft_prompt_template, text_columns, worded_template

    template_field = any(f.name == "template" for f in dataclasses.fields(config))
    if args.template is not None or args.init_from_adapter or "template" in args.method_options:
        return getattr(config, "template", None) or args.template or DEFAULT_TEMPLATE, config
    columns = text_columns(train_rows, _ignored_columns(args))
    if template_field:
        if not columns:
            raise ConfigError(f"{train_source} has no text column to build the template from (columns: "
                              f"{sorted(train_rows[0])}); pass --template with {{column}} slots and {{soft:N}} tokens.")
        built = soft_prompt_template(columns)
        logger.info("template built from the data's text columns %s: %r (set --template to choose)", columns, built)
        return built, config.replace(template=built)
    adapted = _default_template_for(DEFAULT_TEMPLATE, train_rows[0], args)
    if len(columns) > 1 and any(f not in train_rows[0] for f in _template_fields(adapted)):
        raise ConfigError(f"{train_source} has {len(columns)} text columns {columns}, and the default template "
                          f"{DEFAULT_TEMPLATE!r} is worded for one; pass a template that places each, e.g. "
                          f"--template '{worded_template(columns)}' (with --label-words for its classes).")
    if adapted != DEFAULT_TEMPLATE:
        logger.info("default template %r adapted to the data's text column: %r (set --template to choose)",
                    DEFAULT_TEMPLATE, adapted)
    return adapted, config


def _template_fields(text: str) -> list[str]:
    from pstar_plugins.tasks.template import Template

    return Template.parse(text).fields


def _ignored_columns(args) -> set[str]:
    """The columns a template does not place: the label (classification) or the target (generation)."""
    return {args.label_column} if args.task == "classification" else {args.target_column}


def _default_template_for(text: str, row: dict, args) -> str:
    """A default template whose one text slot names no column of the data, pointed at the
    data's one text column when there is exactly one."""
    from pstar_plugins.data_templates import text_columns
    from pstar_plugins.tasks.template import Template

    missing = [f for f in Template.parse(text).fields if f not in row]
    candidates = text_columns([row], _ignored_columns(args))
    if len(missing) == 1 and len(candidates) == 1:
        return text.replace("{" + missing[0] + "}", "{" + candidates[0] + "}")
    return text


def _check_template(template, args, train_rows, train_source) -> None:
    if args.model_kind == "causal-lm" or args.task == "generation":
        template.check_answer_last()
    if not template.has_answer:
        raise ConfigError(f"template {template.text!r} has no {{answer}} slot; add one at the end, "
                          "e.g. --template 'Review: {sentence} Sentiment:{answer}'.")
    for name in template.fields:
        if name not in train_rows[0]:
            raise ConfigError(f"template slot {{{name}}} is not a column of {train_source} (columns: {sorted(train_rows[0])}); "
                              f"rename a column with --column DATA_COLUMN={name}, or change the slot with --template.")


def _check_room(template, tokenizer, max_length: int) -> None:
    """The template alone (its soft tokens included) must leave room for the example's text."""
    empty = template.encode({name: "" for name in template.fields}, tokenizer, stop_at_answer=True)
    used = len(empty.input_ids)
    if used >= max_length:
        raise ConfigError(f"--max-length {max_length} leaves no room for the text: the template {template.text!r} alone "
                          f"takes {used} tokens (soft tokens and special tokens included); pass --max-length "
                          f"{used + 64} or more, or shorten the template.")


@dataclass
class Plan:
    """What a run was asked for, resolved and checked before any model loads: the method and its
    config (preset, flags, or a saved adapter's), the learning rate, the data splits and the
    template, the output folder and the checkpoint to continue."""

    args: argparse.Namespace
    spec: Any
    config: Any
    adapter: tuple | None  # (metadata, tensors) of --init-from-adapter
    lr: float
    out_dir: Path
    run_id: dict
    resume: Path | None
    template: Any
    task: Any
    train: Any  # script_tasks.Split
    evaluation: Any
    selection: Any  # the selection split, or None


def _main(argv, prog: str = "pstar train"):
    from pstar_plugins import run_dir

    plan = _plan(parse_args(argv, prog))
    main_process = os.environ.get("RANK", "0") == "0"
    lock = run_dir.RunLock(plan.out_dir) if main_process else None
    if lock is not None:
        lock.acquire()
    try:
        if main_process:  # under the lock: a run that finished meanwhile is seen
            run_dir.check_previous_run(plan.out_dir, plan.run_id, plan.args.overwrite, plan.resume is not None, plan.args.plot)
            if plan.args.overwrite and plan.resume is None:
                run_dir.clear_previous_run(plan.out_dir, plan.args.plot)
        return _train(plan)
    finally:
        if lock is not None:
            lock.release()


def _check_sizes(args, spec, config) -> None:
    """Options that size tensors against the model's position limit and the memory left, from the
    model's config alone (core.sizes); a config that cannot be read is left to the loader."""
    from pstar_plugins import sizes
    from pstar_plugins.methods.embedding_prompt import EmbeddingPromptMethod
    from pstar_plugins.models import resolve

    try:
        from transformers import AutoConfig

        path, gguf = resolve(args.model, args.gguf_file)
        model_config = AutoConfig.from_pretrained(path, **({"gguf_file": gguf} if gguf else {}))
    except Exception:  # unreachable hub or an unusual folder: loading reports it
        return
    in_sequence = issubclass(spec.resolve_class(), EmbeddingPromptMethod)
    sizes.check(config, model_config, in_sequence, args.batch_size, args.max_length)


def _plan(args) -> Plan:
    """Method and config, data, schedule, template and output folder, all checked (no torch)."""
    from pstar_plugins import run_dir
    from pstar_plugins.models import check_source
    from pstar_plugins.plugins import get_plugin_manager
    from pstar_plugins.script_tasks import make_task
    from pstar_plugins.tasks.template import Template

    spec = get_plugin_manager().method(args.method)
    config, adapter = _method_config(args, spec)
    lr = args.learning_rate if args.learning_rate is not None else spec.preset.learning_rate
    out_dir = Path(args.output_dir)
    run_dir.check_writable(out_dir)
    train_rows, train_source, eval_rows, eval_source, select_rows, rows_read = _data(args)
    processes = int(os.environ.get("WORLD_SIZE", "1"))
    task = make_task(args)
    train, evaluation = task.split(train_rows, train_source), task.split(eval_rows, eval_source)
    selection = task.split(select_rows, train_source) if select_rows is not None else None
    template_text, config = _template_text(args, config, train_rows, train_source)
    template = Template.parse(template_text)
    _check_template(template, args, train_rows, train_source)
    # the rows one step takes, before the schedule, whose warm-up and epochs count those steps
    needed = args.batch_size * processes
    if len(train_rows) < needed:  # refused below; how many rows the data holds words the advice
        limited = args.max_train_samples is not None and rows_read == args.max_train_samples
        available = _rows_without_limit(args) if limited else rows_read
        check_batch_fits(len(train_rows), args.batch_size, processes, data_limits(args, rows_read, available, needed))
    resolve_schedule(args, len(train_rows), processes)
    check_source(args.model, args.model_kind, args.gguf_file, args.task)
    config = task.configure(config)
    _check_sizes(args, spec, config)
    if adapter is not None and spec.config_class.from_saved(adapter[0]["method_config"]) != config:
        raise ConfigError(f"--init-from-adapter {args.init_from_adapter} was trained with another number of classes than "
                          f"the {len(args.label_words)} --label-words; pass the label words it was trained with.")
    resume = run_dir.checkpoint_to_resume(args.resume_from_checkpoint, out_dir)
    if resume is not None:
        run_dir.check_resume(resume, args.method, args.max_steps)
        _check_same_data_plan(resume, args)
    run_id = {"method": args.method, "model": args.model, "train_file": train_source}
    return Plan(args, spec, config, adapter, lr, out_dir, run_id, resume, template, task, train, evaluation, selection)


@dataclass
class Run:
    """A run in progress: the plan, the prepared model and optimizer, and the loop's state
    (data order, RNG, history, selection), which a checkpoint saves and a resume restores."""

    plan: Plan
    accelerator: Any
    model: Any  # as Accelerate prepared it (DDP / DeepSpeed engine)
    core: Any  # the PStarModel inside
    optimizer: Any
    scheduler: Any
    results: dict
    chooser: Any  # selection.Selection
    history: dict
    rng: random.Random
    order: list = field(default_factory=list)
    start_step: int = 0

    @property
    def args(self):
        return self.plan.args


def _train(plan: Plan) -> int:
    """Set up, build or continue, train, finish: the steps of one run."""
    accelerator = _accelerator(plan.args)
    model, init_gathers = _build_or_continue(plan, accelerator)
    optimizer, scheduler = _optimizer_and_schedule(model, plan, accelerator)
    trainable, frozen = model.parameter_counts()
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    run = _start(plan, accelerator, model, optimizer, scheduler, trainable, frozen, init_gathers)
    if _training_loop(run):
        _finish(run)
    accelerator.end_training()
    from pstar_plugins.core import distributed

    distributed.shut_down()
    return 0


def _accelerator(args):
    """Accelerate, set up for this launch (one process, DDP or DeepSpeed, with or without GPUs)."""
    _quiet_third_party(sys.stderr.isatty())
    import datetime

    import torch
    from accelerate import Accelerator, InitProcessGroupKwargs
    from accelerate.utils import set_seed

    # without a GPU, multi-process runs need gloo (otherwise Accelerate sees one process while
    # DeepSpeed sees several); a single plain process must not ask for a process group at all
    # DDP without GPUs must be asked for as cpu=True: otherwise Accelerate silently runs every
    # process on its own (DistributedType.NO, no gradient sync)
    several = int(os.environ.get("WORLD_SIZE", "1")) > 1
    deepspeed = os.environ.get("ACCELERATE_USE_DEEPSPEED", "").lower() == "true"
    no_gpu = not torch.cuda.is_available()
    timeout = datetime.timedelta(seconds=args.dist_timeout)
    handlers = [InitProcessGroupKwargs(backend="gloo" if no_gpu else None, timeout=timeout)] if several else []
    # our loop counts optimizer steps itself: the scheduler must advance once per step, not once
    # per process (Accelerate's default assumes a dataloader it sharded)
    accelerator = Accelerator(kwargs_handlers=handlers, step_scheduler_with_optimizer=False,
                              cpu=several and no_gpu and not deepspeed, **tracking.accelerator_kwargs(args))
    if several and accelerator.distributed_type.value == "NO":
        raise PStarError(f"{os.environ.get('WORLD_SIZE')} processes were launched but Accelerate set up no "
                         "process group, so gradients would not be synchronised; check the launcher config.")
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        level=logging.INFO if accelerator.is_main_process else logging.ERROR)
    set_seed(args.seed)
    return accelerator


def _build_or_continue(plan: Plan, accelerator):
    """The frozen model with the method on it: built from the config, or the saved adapter of
    ``--init-from-adapter`` loaded through :func:`load_adapter` (PEFT refuses this, peft#2256).
    Also returns how many gathers the method's initialisation made (rows, never whole matrices)."""
    from pstar_plugins import build_model
    from pstar_plugins.core import distributed
    from pstar_plugins.core.loading import load_adapter
    from pstar_plugins.models import load, load_tokenizer, quantization_config
    from pstar_plugins.tasks.template import Soft, Template

    args, template = plan.args, plan.template
    tokenizer = load_tokenizer(args.model, args.gguf_file)
    _check_room(template, tokenizer, args.max_length)
    # before the model loads; an adapter is checked as it will be built (for_loading skips the initialisations)
    config = plan.config if plan.adapter is None else plan.config.for_loading()
    plan.spec.resolve_class().check_tokenizer(config, tokenizer)
    # every rank loads at the same time: under ZeRO-3 the model is built inside zero.Init, whose
    # parameter partitioning is a collective; main_process_first() here would deadlock
    quantized = quantization_config(args)
    # a quantized model is placed where it is quantized (bitsandbytes packs on the device): this rank's
    placement = {"quantization_config": quantized, "device_map": {"": str(accelerator.device)}} if quantized else {}
    base, tokenizer = load(args.model, kind=args.model_kind, gguf_file=args.gguf_file, tokenizer=tokenizer,
                           dtype=args.dtype, attn_implementation=args.attn_implementation, **placement)
    with distributed.recording_gathers() as init_calls:
        if plan.adapter is None:
            model = build_model(base, args.method, plan.config, tokenizer=tokenizer)
        else:
            model = load_adapter(base, args.init_from_adapter, tokenizer=tokenizer, contents=plan.adapter)
            logger.info("continuing from adapter %s", args.init_from_adapter)
    init_gathers = len(init_calls)
    if args.gradient_checkpointing:
        model.activation_checkpointing_enable()
    model.packing = args.packing
    zero_shot_template = Template(template.text, [p for p in template.parts if not isinstance(p, Soft)])
    plan.task.bind(tokenizer, template, zero_shot_template, accelerator.device, base, plan.config.has_classifier_head())
    for split in (plan.evaluation, plan.selection):
        plan.task.prepare(split)
    return model, init_gathers


def _optimizer_and_schedule(model, plan: Plan, accelerator):
    """AdamW over the plugins' parameter groups, and transformers' schedule (as the Trainer's)."""
    from transformers import get_scheduler

    from pstar_plugins.core.build import make_optimizer

    args = plan.args
    optimizer = make_optimizer(model, plan.lr, args.weight_decay)
    scheduler = get_scheduler(args.lr_scheduler_type, optimizer, num_warmup_steps=min(args.warmup_steps, args.max_steps),
                              num_training_steps=args.max_steps)
    ds_plugin = getattr(accelerator.state, "deepspeed_plugin", None)
    if ds_plugin is not None:  # we feed batches ourselves, so tell DeepSpeed the micro-batch size
        ds_plugin.deepspeed_config["train_micro_batch_size_per_gpu"] = args.batch_size
        # DeepSpeed clips inside its step; "auto" would become 1.0 whatever --max-grad-norm says
        ds_plugin.deepspeed_config["gradient_clipping"] = args.max_grad_norm
    return optimizer, scheduler


def _start(plan: Plan, accelerator, model, optimizer, scheduler, trainable: int, frozen: int, init_gathers: int) -> Run:
    """The run's record, the tracker, the zero-shot baseline, and the loop's state (fresh or resumed)."""
    from pstar_plugins.selection import Selection

    args, task, core = plan.args, plan.task, accelerator.unwrap_model(model)
    metric = task.metric_name
    results = {"method": args.method, "model": args.model, "task": args.task, "metric": metric,
               "trainable_parameters": trainable, "frozen_parameters": frozen, "init_gather_calls": init_gathers,
               "train_rows": len(plan.train), "selection_rows": len(plan.selection) if plan.selection else 0,
               "evaluation_rows": len(plan.evaluation), "max_steps": args.max_steps,
               "expected_examples": plan.spec.preset.expected_examples, **task.results_fields()}
    chooser = Selection(keep_best=args.select_best == "best", patience=args.early_stopping_patience)
    run = Run(plan, accelerator, model, core, optimizer, scheduler, results, chooser,
              {"step": [], "loss": [], "eval_step": [], metric: []}, random.Random(args.seed))
    # --report-to: the run's configuration (flags, resolved method options, learning rate)
    tracking.start(accelerator, {**vars(args), **{f"method.{k}": v for k, v in plan.config.to_dict().items()},
                                 "learning_rate": plan.lr, "trainable_parameters": trainable,
                                 "processes": accelerator.num_processes})
    if not args.no_zero_shot and not plan.config.has_classifier_head():
        value = task.evaluate(core.base_model, plan.evaluation, "zero-shot eval", zero_shot=True,
                              show=accelerator.is_main_process)
        results[f"zero_shot_{metric}"] = value
        tracking.log(accelerator, {f"eval/zero_shot_{metric}": value}, step=0)
        logger.info("zero-shot %s (template %r): %.4f", metric, task.zero_shot_template.text, value)
    _log_run(run, trainable, frozen)
    if plan.resume is not None:
        _resume(run, plan.resume)
    if accelerator.is_main_process:
        plan.out_dir.mkdir(parents=True, exist_ok=True)
        (plan.out_dir / "run.json").write_text(json.dumps(plan.run_id))
    return run


def _log_run(run: Run, trainable: int, frozen: int) -> None:
    args, plan = run.args, run.plan
    logger.info("***** Running training *****")
    logger.info("  method = %s, model = %s", args.method, args.model)
    logger.info("  trainable parameters = %d, frozen = %d (%.4f%%)", trainable, frozen, 100 * trainable / max(1, trainable + frozen))
    logger.info("  examples = %d, steps = %d, batch per process = %d, processes = %d, lr = %g",
                len(plan.train), args.max_steps, args.batch_size, run.accelerator.num_processes, plan.lr)
    if args.num_train_epochs is not None:
        logger.info("  --num-train-epochs %g: %d steps", args.num_train_epochs, args.max_steps)
    if plan.selection:
        logger.info("  selection split = %d rows, evaluated every %d steps; the adapter saved: %s", len(plan.selection),
                    args.eval_steps, "the best on it" if run.chooser.keep_best else "the last step's")


DATA_PLAN_FLAGS = ("seed", "max_train_samples", "validation_split_percentage", "select_best")


def data_plan(args) -> dict:
    """The flags that decide which rows of the training file train, which select and whether a best
    state is kept: a checkpoint's row order and best value only mean something under the same ones,
    and two recorded runs were selected on the same rows only when theirs are equal
    (``bench/quality.py``)."""
    return {name: getattr(args, name) for name in DATA_PLAN_FLAGS}


def _check_same_data_plan(checkpoint: Path, args) -> None:
    """Refuse, before the model loads, to resume a checkpoint written under other data flags."""
    saved = json.loads((checkpoint / "trainer_state.json").read_text()).get("data_plan")
    if saved is None:
        return  # written before checkpoints recorded it
    changed = [name for name in DATA_PLAN_FLAGS if saved.get(name) != getattr(args, name)]
    if changed:
        flags = ", ".join(f"--{n.replace('_', '-')} {saved.get(n)} (now {getattr(args, n)})" for n in changed)
        raise ConfigError(f"--resume-from-checkpoint {checkpoint} was written with {flags}: its row order and selection "
                          "record belong to those rows; pass the same flags, or start a new run with --overwrite.")


def _resume(run: Run, checkpoint: Path) -> None:
    run.accelerator.load_state(str(checkpoint))
    state = json.loads((checkpoint / "trainer_state.json").read_text())
    run.start_step, run.order, run.history = state["step"], state["order"], state["history"]
    run.rng.setstate((state["rng"][0], tuple(state["rng"][1]), state["rng"][2]))
    if "selection" in state:
        run.chooser.restore(state["selection"], checkpoint)
    logger.info("resumed from %s at step %d", checkpoint, run.start_step)


def _checkpoint(run: Run, step_done: int) -> None:
    """The full training state of every rank, the adapter (and the best one so far), and, written
    last and atomically, trainer_state.json: its presence marks the checkpoint complete."""
    from pstar_plugins import run_dir
    from pstar_plugins.core.adapter_io import save_adapter
    from pstar_plugins.selection import BEST_ADAPTER

    args, accelerator, out_dir = run.args, run.accelerator, run.plan.out_dir
    ckpt = out_dir / f"checkpoint-{step_done}"
    # the model's state is its adapter (PStarModel.state_dict); DeepSpeed would add every rank's
    # shard of the frozen weights ("frozen_param_fragments") unless told not to
    accelerator.save_state(str(ckpt), exclude_frozen_parameters=True)  # adapter, optimizer, scheduler, RNG
    trainable_state = run.core.trainable_state()  # collective under ZeRO-3: every rank gathers
    if accelerator.is_main_process:
        record = run.plan.task.record()
        save_adapter(run.core, ckpt / "adapter", state=trainable_state, task=record)
        if run.chooser.state is not None:  # the best so far: a resumed run can still end with it
            save_adapter(run.core, ckpt / BEST_ADAPTER, state=run.chooser.state, task=record)
        rng_state = run.rng.getstate()
        payload = {"step": step_done, "order": run.order, "history": run.history,
                   "rng": [rng_state[0], list(rng_state[1]), rng_state[2]], "data_plan": data_plan(args)}
        if run.plan.selection:
            payload["selection"] = run.chooser.to_json()
        tmp = ckpt / "trainer_state.json.tmp"
        tmp.write_text(json.dumps(payload))
        os.replace(tmp, ckpt / "trainer_state.json")
        for old in run_dir.prune_checkpoints(out_dir, args.checkpoints_total_limit):
            logger.info("removed %s (--checkpoints-total-limit %d)", old.name, args.checkpoints_total_limit)
    accelerator.wait_for_everyone()


def _next_rows(run: Run) -> tuple[list, list]:
    """This rank's share of the next global batch, drawn from a seeded shuffle, epoch after epoch
    (a batch may span two epochs; :func:`check_batch_fits` makes one epoch at least one batch)."""
    args, world, rank = run.args, run.accelerator.num_processes, run.accelerator.process_index
    global_batch = args.batch_size * world
    if len(run.order) < global_batch:
        fresh = list(range(len(run.plan.train)))
        run.rng.shuffle(fresh)
        run.order += fresh
    chosen, run.order = run.order[:global_batch], run.order[global_batch:]
    return run.plan.train.take(chosen[rank * args.batch_size:(rank + 1) * args.batch_size])


def _training_loop(run: Run) -> bool:
    """Train to --max-steps (or an early stop); False when --stop-after-steps left early."""
    import torch
    from tqdm.auto import tqdm

    args, accelerator, model = run.args, run.accelerator, run.model
    clip = args.max_grad_norm and getattr(accelerator.state, "deepspeed_plugin", None) is None
    model.train()
    interactive = sys.stderr.isatty()
    # a terminal gets a progress bar; a log file one line per --logging-steps, not carriage returns
    progress = tqdm(range(run.start_step, args.max_steps), desc="training", disable=not (accelerator.is_main_process and interactive))
    for step in progress:
        loss = run.plan.task.loss(model, *_next_rows(run))
        if not torch.isfinite(loss):
            raise PStarError(f"loss became {loss.item()} at step {step + 1}; lower --learning-rate. Checkpoints so far are kept.")
        accelerator.backward(loss)
        if clip:
            accelerator.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], args.max_grad_norm)
        run.optimizer.step()
        run.scheduler.step()
        run.optimizer.zero_grad()
        loss_value = accelerator.reduce(loss.detach(), reduction="mean").item()
        run.history["step"].append(step + 1)
        run.history["loss"].append(loss_value)
        progress.set_postfix(loss=f"{loss_value:.4f}")
        rate = run.scheduler.get_last_lr()[0]
        tracking.log(accelerator, {"train/loss": loss_value, "train/learning_rate": rate}, step=step + 1)
        if not interactive and ((step + 1) % args.logging_steps == 0 or step + 1 == args.max_steps):
            logger.info("step %d/%d: loss %.4f, lr %.3g", step + 1, args.max_steps, loss_value, rate)
        if _periodic_evaluation(run, step + 1, loss_value):
            break
        if args.checkpointing_steps and (step + 1) % args.checkpointing_steps == 0:
            _checkpoint(run, step + 1)
        if args.stop_after_steps and step + 1 - run.start_step >= args.stop_after_steps and step + 1 < args.max_steps:
            if not (args.checkpointing_steps and (step + 1) % args.checkpointing_steps == 0):
                _checkpoint(run, step + 1)
            logger.info("stopping after %d steps in this run (--stop-after-steps); resume with --resume-from-checkpoint latest", args.stop_after_steps)
            return False
    return True


def _periodic_evaluation(run: Run, step: int, loss_value: float) -> bool:
    """Evaluate every --eval-steps: the selection split when there is one (also at the last
    step), else the first --eval-subset-size evaluation rows. True: stop early."""
    args, plan, accelerator, metric = run.args, run.plan, run.accelerator, run.plan.task.metric_name
    if not args.eval_steps:
        return False
    scoring = plan.task.evaluation_model(run.model, run.core)
    show = accelerator.is_main_process
    if plan.selection and (step % args.eval_steps == 0 or step == args.max_steps):
        value = plan.task.evaluate(scoring, plan.selection, "selection eval", show=show)
        if accelerator.num_processes > 1:  # one decision for every rank: keeping the best state is a collective under ZeRO-3
            from accelerate.utils import broadcast_object_list

            value = broadcast_object_list([value])[0]
        improved = run.chooser.record(step, value, run.core.trainable_state)  # a collective under ZeRO-3: every rank
        run.history["eval_step"].append(step)
        run.history[metric].append(value)
        tracking.log(accelerator, {f"selection/{metric}": value}, step=step)
        logger.info("step %d: loss %.4f, selection %s %.4f%s", step, loss_value, metric, value, " (best so far)" if improved
                    else f" (best {run.chooser.best_value:.4f} at step {run.chooser.best_step})")
    elif not plan.selection and step % args.eval_steps == 0 and step < args.max_steps:
        value = plan.task.evaluate(scoring, plan.evaluation, "eval", limit=args.eval_subset_size, show=show)
        run.history["eval_step"].append(step)
        run.history[metric].append(value)
        tracking.log(accelerator, {f"eval/{metric}": value}, step=step)
        logger.info("step %d: loss %.4f, dev %s %.4f (first %d)", step, loss_value, metric, value, args.eval_subset_size)
    if run.chooser.should_stop:
        logger.info("early stop at step %d: %d selection evaluations without improvement (--early-stopping-patience)",
                    step, run.chooser.without_improvement)
        run.results["early_stopped_at"] = step
        return True
    return False


def _finish(run: Run) -> None:
    """The final evaluation (of the best state, with --select-best best), the adapter, metrics.json,
    the plot and the summary."""
    from pstar_plugins import run_dir
    from pstar_plugins.core import distributed
    from pstar_plugins.core.adapter_io import save_adapter

    args, plan, accelerator, core, results, history = run.args, run.plan, run.accelerator, run.core, run.results, run.history
    metric, out_dir = plan.task.metric_name, plan.out_dir
    steps_done = history["step"][-1] if history["step"] else run.start_step
    results.update(steps=steps_done, examples_seen=steps_done * args.batch_size * accelerator.num_processes)
    if plan.selection:
        results["selection"] = run.chooser.report(metric, len(plan.selection))
    if run.chooser.state is not None:  # every rank: the load is collective under ZeRO-3
        core.load_trainable_state(run.chooser.state)
        logger.info("final evaluation with the best state on the selection split: step %d (%s %.4f)",
                    run.chooser.best_step, metric, run.chooser.best_value)
    scoring = plan.task.evaluation_model(run.model, core)
    started = time.perf_counter()
    results[f"tuned_{metric}"] = plan.task.evaluate(scoring, plan.evaluation, "final eval", show=accelerator.is_main_process)
    results["final_eval_seconds"] = time.perf_counter() - started  # every rank scores its share (script_tasks)
    history["eval_step"].append(steps_done)
    history[metric].append(results[f"tuned_{metric}"])
    tracking.log(accelerator, {f"eval/{metric}": results[f"tuned_{metric}"]}, step=steps_done)
    started = time.perf_counter()
    with distributed.recording_gathers() as save_calls:
        state = core.trainable_state()  # collective under ZeRO-3: only the method's partitions
    results["save"] = _save_record(core, state, save_calls)
    if accelerator.is_main_process:
        save_adapter(core, out_dir / "adapter", state=state, task=plan.task.record())
        results["save"]["seconds"] = time.perf_counter() - started
        results["history"] = history
        (out_dir / "metrics.json").write_text(json.dumps(results, indent=2))
        if args.plot:
            _plot(history, out_dir / args.plot, args.method, metric, args.eval_subset_size, periodic_on_selection=bool(plan.selection))
        written = [out_dir / "adapter", out_dir / "metrics.json"]
        if args.plot and (out_dir / args.plot).is_file():
            written.append(out_dir / args.plot)
        written += run_dir.complete_checkpoints(out_dir)
        print(_summary(args, results, metric, written))


def _save_record(core, state: dict, calls: list) -> dict:
    """What the final save gathered (``calls``, recorded; under ZeRO-3: the method's partitions
    only, no frozen weight)."""
    gathered_ids = {i for call in calls for i in call}
    frozen_ids = {id(p) for p in core.parameters() if not p.requires_grad}
    return {"gather_calls": len(calls), "gathered_parameters": len(gathered_ids),
            "frozen_parameters_gathered": len(gathered_ids & frozen_ids),
            "bytes": sum(t.numel() * t.element_size() for t in state.values())}


def _is_cpu_notice(record: logging.LogRecord) -> bool:
    return "Setting accelerator to CPU" not in record.getMessage()


def _quiet_third_party(interactive: bool) -> None:
    """Keep other libraries' notices out of a normal run's output: DeepSpeed's "Setting
    accelerator to CPU" on machines without a GPU, and, in a log file, the weight-loading bar."""
    logging.getLogger("DeepSpeed").addFilter(_is_cpu_notice)  # the logger DeepSpeed writes through
    if not interactive:
        # tqdm reads TQDM_DISABLE when it is imported: other libraries' bars (GGUF conversion, ...)
        os.environ.setdefault("TQDM_DISABLE", "1")
        from transformers.utils import logging as transformers_logging

        transformers_logging.disable_progress_bar()


def _summary(args, results: dict, metric: str, written: list[Path]) -> str:
    """The closing report: the scores (with their scales) and every file this run wrote."""
    from pstar_plugins.script_tasks import BY_METRIC

    lines = ["", "-" * 60, f"method {args.method} on {args.model}", *BY_METRIC[metric].summary_lines(results)]
    lines += _run_size_lines(args, results, metric)
    lines.append("  files written:")
    lines += [f"    {p}{'/' if p.is_dir() else ''}" for p in written]
    lines.append("-" * 60)
    return "\n".join(lines)


def _run_size_lines(args, results: dict, metric: str) -> list[str]:
    """How much the run trained, and what the selection split chose."""
    if "steps" not in results:
        return []
    lines = [f"  training               : {results['steps']} steps, {results['examples_seen']} examples seen "
             f"({results['train_rows']} training rows)"
             + (f"; the preset expects {results['expected_examples']}" if results.get("expected_examples") else "")]
    if results.get("early_stopped_at"):
        lines.append(f"  early stop             : at step {results['early_stopped_at']} (--early-stopping-patience)")
    chosen = results.get("selection")
    if chosen and chosen["best_step"] is not None:
        lines.append(f"  selection split        : {chosen['rows']} rows; best {metric} {chosen[f'best_{metric}']:.4f} at step "
                     f"{chosen['best_step']}, last {chosen[f'last_{metric}']:.4f} at step {chosen['last_step']}; "
                     f"saved: the {'best' if chosen['select'] == 'best' else 'last'} step's adapter")
    return lines


def _smooth(values: list[float], weight: float = 0.9) -> list[float]:
    """Exponential moving average with bias correction (TensorBoard's smoothing)."""
    out, average = [], 0.0
    for i, v in enumerate(values, start=1):
        average = weight * average + (1 - weight) * v
        out.append(average / (1 - weight ** i))
    return out


def _plot(history, path: Path, method: str, metric: str = "accuracy", subset: int = 0, periodic_on_selection: bool = False) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        logger.warning("matplotlib is not installed; no plot written (pip install matplotlib)")
        return
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(history["step"], history["loss"], color="tab:blue", alpha=0.25, linewidth=0.8, label="training loss (raw)")
    ax.plot(history["step"], _smooth(history["loss"]), color="tab:blue", label="training loss (smoothed)")
    ax.set_xlabel("step")
    ax.set_ylabel("training loss", color="tab:blue")
    ax2 = ax.twinx()
    # the periodic evaluations score a subset, the last one the whole dev set: two series, not one line
    periodic = list(zip(history["eval_step"][:-1], history[metric][:-1]))
    if periodic:
        label = (f"selection-split {metric}" if periodic_on_selection
                 else f"dev {metric}, first {subset} rows" if subset else f"dev {metric}")
        ax2.plot(*zip(*periodic), "o-", color="tab:red", label=label)
    if history["eval_step"]:
        ax2.plot(history["eval_step"][-1:], history[metric][-1:], "*", color="black", markersize=12, label=f"final dev {metric}, all rows")
    ax2.set_ylabel(f"dev {metric}", color="tab:red")
    handles = ax.get_legend_handles_labels()[0] + ax2.get_legend_handles_labels()[0]
    ax.legend(handles, [h.get_label() for h in handles], loc="best", fontsize=8)
    ax.set_title(f"{method}: training loss and dev {metric}")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)



def _checkpoint_to_resume(args, out_dir: Path) -> Path | None:
    """The checkpoint ``--resume-from-checkpoint`` names (see :func:`run_dir.checkpoint_to_resume`)."""
    from pstar_plugins import run_dir

    return run_dir.checkpoint_to_resume(args.resume_from_checkpoint, out_dir)


if __name__ == "__main__":
    raise SystemExit(main())

"""``pstar train``'s command line: the flags and the typed config they parse to (their checks:
:mod:`pstar_plugins.train.checks`).

Nothing here imports torch or transformers: ``--help``, a typo or a bad value answers at once,
before any model loads (docs/recipes.md lists the flags by task).
"""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass
from typing import Any

from pstar_plugins import arguments
from pstar_plugins.mechanisms.template import DEFAULT_TEMPLATE, from_command_line
from pstar_plugins.models import add_loading_arguments
from pstar_plugins.train import tracking
from pstar_plugins.train.checks import check_args

LR_SCHEDULES = {"linear": "linear decay to 0", "cosine": "half-cosine decay to 0", "constant_with_warmup": "constant"}


@dataclass
class TrainConfig:
    """What one ``pstar train`` run is asked for: every flag, typed, with the method's own options
    in :attr:`method_options`. Made by :func:`parse_args` from the parser, which holds the defaults
    and the help (``pstar train --help``); nothing imports torch to make it."""

    method: str
    method_options: dict[str, Any]  #: the method's own flags (``--num-virtual-tokens``, ...)
    plugin: list[str]  #: ``-p MODULE[:OBJECT]``: plugins loaded before the method is looked up
    # -- the frozen model
    model: str
    model_kind: str
    gguf_file: str | None
    dtype: str
    attn_implementation: str
    load_in_4bit: bool
    load_in_8bit: bool
    bnb_4bit_quant_type: str | None
    bnb_4bit_compute_dtype: str | None
    # -- data
    train_file: str | None
    validation_file: str | None
    dataset: str | None
    dataset_config: str | None
    train_split: str
    validation_split: str
    column: list[str]  #: ``NAME=COLUMN`` renames
    max_train_samples: int | None
    max_eval_samples: int | None
    validation_split_percentage: int | None
    # -- the task
    task: str
    template: str | None
    label_column: str
    label_words: list[str]
    target_column: str
    max_new_tokens: int
    max_length: int
    # -- training
    output_dir: str
    seed: int
    batch_size: int
    eval_batch_size: int
    learning_rate: float | None  #: ``None``: the method's preset
    weight_decay: float
    max_grad_norm: float
    max_steps: int
    num_train_epochs: float | None
    lr_scheduler_type: str
    warmup_steps: int
    warmup_ratio: float | None
    packing: bool
    gradient_checkpointing: bool
    init_from_adapter: str | None
    # -- evaluation, selection and checkpoints
    eval_steps: int
    eval_subset_size: int
    no_zero_shot: bool
    select_best: str
    early_stopping_patience: int
    checkpointing_steps: int
    checkpoints_total_limit: int
    resume_from_checkpoint: str | None
    stop_after_steps: int
    overwrite: bool
    # -- reporting and processes
    logging_steps: int
    plot: str
    report_to: list[str]
    dist_timeout: int


def _add_model_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model", default="smollm2", help="offline alias (smollm2, minilm), a local folder, or any hub model id"
    )
    parser.add_argument("--gguf-file", default=None, help="GGUF file inside --model's folder, if the weights are GGUF")
    parser.add_argument(
        "--model-kind", default="causal-lm", choices=["causal-lm", "masked-lm"], help="which head to load"
    )
    add_loading_arguments(parser)


def _add_data_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--train-file",
        default=None,
        help="training data (.csv, .tsv, .jsonl); with neither it nor --dataset: the packaged SST-2 sample",
    )
    parser.add_argument(
        "--validation-file",
        default=None,
        help="evaluation data (.csv, .tsv, .jsonl); without --train-file: the packaged SST-2 dev set; "
        "with --train-file: required, unless --validation-split-percentage splits one off",
    )
    parser.add_argument(
        "--validation-split-percentage",
        type=int,
        default=None,
        metavar="P",
        help="hold P%% of the training rows out (seeded by --seed; the rest trains) as the selection split: the "
        "periodic evaluations and --select-best use it, the final evaluation uses --validation-file "
        "(without one, the held-out rows are the evaluation set)",
    )
    parser.add_argument(
        "--dataset",
        default=None,
        help="a Hugging Face datasets id or local dataset folder to use instead of --train-file/--validation-file",
    )
    parser.add_argument("--dataset-config", default=None, help="the dataset's configuration (e.g. sst2 for glue)")
    parser.add_argument("--train-split", default="train", help="--dataset split to train on")
    parser.add_argument("--validation-split", default="validation", help="--dataset split to evaluate on")
    parser.add_argument(
        "--column",
        action="append",
        default=[],
        metavar="DATA_COLUMN=NAME",
        help="rename a data column to the name the template or --label-column uses (repeatable)",
    )
    parser.add_argument(
        "--max-train-samples", type=int, default=None, metavar="N", help="use only the first N training rows"
    )
    parser.add_argument(
        "--max-eval-samples", type=int, default=None, metavar="N", help="use only the first N evaluation rows"
    )


def _add_task_arguments(parser: argparse.ArgumentParser, built_from_columns: bool) -> None:
    if built_from_columns:
        default = "'{soft:3} {column} ... {soft:3}{answer}' built from the data's text columns"
    else:
        default = f"{DEFAULT_TEMPLATE!r}, its slot renamed to the data's one text column".replace("%", "%%")
    parser.add_argument(
        "--template",
        default=None,
        help=(
            f"template with {{column}} slots and one {{answer}} slot at the end; \\n is a newline (default: {default})"
        ),
    )
    parser.add_argument(
        "--task",
        default="classification",
        choices=["classification", "generation"],
        help="classification (label words or a linear head) or generation (loss on the target tokens only)",
    )
    parser.add_argument("--target-column", default="ref", help="generation: the column with the target text")
    parser.add_argument(
        "--max-new-tokens", type=int, default=64, metavar="N", help="generation: tokens to decode in evaluation"
    )
    parser.add_argument("--label-column", default="label", help="column with the class (index or label word)")
    parser.add_argument(
        "--label-words",
        nargs="+",
        default=["negative", "positive"],
        metavar="WORD",
        help="one word per class, in class order",
    )


def _add_training_arguments(parser: argparse.ArgumentParser, preset_lr: float | None) -> None:
    lr_default = (
        f"{preset_lr:g}, this method's preset"
        if preset_lr is not None
        else "the method's preset; see --method NAME --help"
    )
    parser.add_argument("--output-dir", required=True, help="where the adapter, checkpoints, metrics and plot go")
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="replace the run in --output-dir (a finished or a different one), its checkpoints included",
    )
    parser.add_argument(
        "--learning-rate", type=float, default=None, metavar="LR", help=f"base learning rate (default: {lr_default})"
    )
    parser.add_argument("--weight-decay", type=float, default=0.0, help="weight decay of the non-embedding groups")
    parser.add_argument(
        "--max-grad-norm",
        type=float,
        default=1.0,
        help="clip the global gradient norm (0: no clipping); DeepSpeed gets the same value",
    )
    parser.add_argument("--batch-size", type=int, default=16, metavar="N", help="per-process training batch size")
    parser.add_argument(
        "--eval-batch-size", type=int, default=32, metavar="N", help="per-process evaluation batch size"
    )
    parser.add_argument("--max-steps", type=int, default=None, metavar="N", help="optimizer steps (default: 100)")
    parser.add_argument(
        "--num-train-epochs",
        type=float,
        default=None,
        metavar="E",
        help="train for E passes over the training rows instead of --max-steps: "
        "ceil(rows / (batch size x processes)) x E steps, rounded up",
    )
    parser.add_argument(
        "--warmup-steps",
        type=int,
        default=None,
        metavar="N",
        help="linear warm-up steps, at most the run's steps (default: 10, or the steps when those are fewer)",
    )
    parser.add_argument(
        "--warmup-ratio",
        type=float,
        default=None,
        metavar="R",
        help="warm up for this fraction (0-1) of the run's steps, rounded up, instead of --warmup-steps",
    )
    parser.add_argument(
        "--lr-scheduler-type",
        default="linear",
        choices=list(LR_SCHEDULES),
        help="learning-rate schedule after the warm-up (transformers' schedules): "
        + "; ".join(f"{k}: {v}" for k, v in LR_SCHEDULES.items()),
    )
    parser.add_argument(
        "--max-length", type=int, default=128, metavar="N", help="truncate examples to this many tokens"
    )


def _add_evaluation_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--eval-steps", type=int, default=25, metavar="N", help="evaluate every N steps (0: only at the end)"
    )
    parser.add_argument(
        "--eval-subset-size",
        type=int,
        default=128,
        metavar="N",
        help="without a selection split, periodic evaluations use the first N evaluation rows (the final one uses all)",
    )
    parser.add_argument(
        "--select-best",
        default="last",
        choices=["last", "best"],
        help="the adapter a run saves: the last step's (last), or the one that scored best on the selection "
        "split at the periodic evaluations (best; needs --validation-split-percentage)",
    )
    parser.add_argument(
        "--early-stopping-patience",
        type=int,
        default=0,
        metavar="N",
        help="stop after N selection evaluations in a row without improvement (0: never; needs "
        "--validation-split-percentage)",
    )


def _add_checkpoint_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--checkpointing-steps",
        type=int,
        default=0,
        metavar="N",
        help="save the full training state every N steps (0: never)",
    )
    parser.add_argument(
        "--checkpoints-total-limit",
        type=int,
        default=0,
        metavar="N",
        help="keep only the newest N complete checkpoints (0: keep all)",
    )
    parser.add_argument(
        "--resume-from-checkpoint",
        default=None,
        metavar="PATH|latest|latest-if-any",
        help="checkpoint folder to resume from; 'latest' (the newest complete one in --output-dir) or "
        "'latest-if-any' (the same, or a fresh start when there is none: for preemptible jobs)",
    )
    parser.add_argument(
        "--init-from-adapter",
        default=None,
        metavar="DIR",
        help="continue training a saved adapter (its method and options are used; a folded one keeps training folded)",
    )
    parser.add_argument(
        "--stop-after-steps",
        type=int,
        default=0,
        metavar="N",
        help=(
            "leave after this many steps in this invocation, with a checkpoint (time-limited jobs); 0: run to "
            "--max-steps"
        ),
    )


def _add_run_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--gradient-checkpointing", action="store_true", help="checkpoint the frozen model's layers to save memory"
    )
    parser.add_argument(
        "--packing",
        action=argparse.BooleanOptionalAction,
        default=True,
        help=(
            "run the frozen decoder-only model on real tokens only, rows packed padding-free (same loss; see "
            "docs/design.md)"
        ),
    )
    parser.add_argument("--seed", type=int, default=42, help="random seed")
    parser.add_argument(
        "--dist-timeout",
        type=int,
        default=600,
        metavar="SECONDS",
        help="seconds a collective may wait for a missing rank before the run fails (instead of hanging)",
    )
    parser.add_argument("--no-zero-shot", action="store_true", help="skip the zero-shot baseline evaluation")
    parser.add_argument(
        "--plot", default="training.png", help="file name (in --output-dir) of the loss/accuracy plot; '' for none"
    )
    parser.add_argument(
        "--logging-steps",
        type=int,
        default=10,
        metavar="N",
        help="when stderr is not a terminal (a log file), log one line every N steps instead of a progress bar",
    )
    tracking.add_arguments(parser)  # --report-to


def build_parser(method_names, method: str | None = None, prog: str = "pstar train") -> arguments.StrictParser:
    """The training script's own flags (``method_names``: the registered methods, for the help).
    With a known ``method`` the defaults shown are the ones that method's run uses."""
    from pstar_plugins.assembly.registry import get_plugin_manager

    preset = get_plugin_manager().method(method).preset if method else None
    parser = arguments.StrictParser(
        prog=prog,
        description="Train a P*-tuning method on a frozen model with Accelerate.",
        epilog="Each method has options of its own: pstar train --method NAME --help lists them, "
        "pstar methods --verbose lists every method's.",
    )
    parser.add_argument("--method", required=True, help=f"method name; one of: {', '.join(sorted(method_names))}")
    arguments.add_plugin_argument(parser)
    _add_model_arguments(parser)
    _add_data_arguments(parser)
    config_fields = (
        {f.name for f in dataclasses.fields(get_plugin_manager().method(method).config_class)} if method else set()
    )
    _add_task_arguments(parser, "template" in config_fields)
    _add_training_arguments(parser, preset.learning_rate if preset else None)
    _add_evaluation_arguments(parser)
    _add_checkpoint_arguments(parser)
    _add_run_arguments(parser)
    return parser


def _pre_parse(argv: list[str] | None):
    """``--method`` and ``-p`` first: they decide which method flags exist."""
    pre = arguments.StrictParser(add_help=False)
    pre.add_argument("--method")
    pre.add_argument("-p", "--plugin", action="append", default=[])
    known, _ = pre.parse_known_args(argv)
    return known


def parse_args(argv: list[str] | None = None, prog: str = "pstar train") -> TrainConfig:
    from pstar_plugins.assembly.registry import get_plugin_manager

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
    parsed = vars(parser.parse_args(argv))
    parsed["method_options"] = {n: parsed[f"m_{n}"] for n in option_names if f"m_{n}" in parsed}
    args = TrainConfig(**{f.name: parsed[f.name] for f in dataclasses.fields(TrainConfig)})
    if args.template is not None:  # converted once: the method config and the task record hold the same text
        args.template = from_command_line(args.template)
    check_args(args)
    return args

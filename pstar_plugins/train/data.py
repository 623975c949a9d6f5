"""The rows a run trains, selects and evaluates on, and the template that turns them into text:
read and checked before any model loads (no torch)."""

from __future__ import annotations

import dataclasses
import json
import logging
import math
from pathlib import Path

from pstar_plugins.contract.errors import ConfigError
from pstar_plugins.mechanisms.template import DEFAULT_TEMPLATE

logger = logging.getLogger("pstar_plugins.train")


def _train_file(args) -> str | None:
    """The training file a run reads: none with --dataset, the packaged SST-2 sample without --train-file."""
    from pstar_plugins.models import packaged_data

    if args.dataset:
        return None
    return args.train_file if args.train_file is not None else packaged_data("sst2_train_sample.tsv")


def read_data(args):
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
            raise ConfigError(
                f"--validation-file {args.validation_file} without --train-file would train on the packaged "
                "SST-2 sample; pass --train-file too."
            )
        validation_file = packaged_data("sst2_dev.tsv")
    else:
        validation_file = args.validation_file
        if validation_file is None and args.validation_split_percentage is None:
            raise ConfigError(
                f"--train-file {args.train_file} without --validation-file: pass --validation-file, or "
                "--validation-split-percentage 10 to evaluate on 10% of the training rows (trained on the rest)."
            )
    train_file = _train_file(args)
    percentage = args.validation_split_percentage
    # --max-train-samples first: the selection split is P% of the rows the run reads
    train_rows, train_source = load_split(
        train_file, args.dataset, args.dataset_config, args.train_split, args.max_train_samples, columns
    )
    rows_read = len(train_rows)
    select_rows = select_source = None
    if percentage is not None:
        train_rows, select_rows = split_held_out(train_rows, train_source, args)
        select_source = f"{train_source} (held-out {percentage}%, seed {args.seed})"
    if percentage is not None and validation_file is None and not args.dataset:
        # no evaluation file: the held-out rows are the evaluation set (and no selection split)
        if args.select_best == "best" or args.early_stopping_patience:
            raise ConfigError(
                f"--train-file {args.train_file} without --validation-file: the held-out rows are the "
                "evaluation set, so choosing the step on them would report a score tuned on its own rows; "
                "pass a --validation-file for the final evaluation."
            )
        eval_rows, eval_source = select_rows[: args.max_eval_samples], select_source
        select_rows = select_source = None
        logger.info(
            "evaluating on %d rows held out of %s (--validation-split-percentage %d)",
            len(eval_rows),
            train_source,
            percentage,
        )
    else:
        eval_rows, eval_source = load_split(
            validation_file, args.dataset, args.dataset_config, args.validation_split, args.max_eval_samples, columns
        )
    if select_rows is not None:
        logger.info(
            "selection split: %d rows held out of %s (--validation-split-percentage %d), %d rows train",
            len(select_rows),
            train_source,
            percentage,
            len(train_rows),
        )
    return train_rows, train_source, eval_rows, eval_source, select_rows, rows_read


def split_held_out(rows: list, source: str, args) -> tuple[list, list]:
    """``(training rows, held-out rows)`` of ``--validation-split-percentage`` (below 100%, so
    rows always remain to train on); refuses a split that holds out no row."""
    from pstar_plugins.train.selection import split_off

    percentage = args.validation_split_percentage
    key = None
    if args.task == "generation":  # rows of one source (its fields but the target) stay on one side
        target = args.target_column
        key = lambda row: tuple(sorted((k, str(v)) for k, v in row.items() if k != target))  # noqa: E731
    train, held = split_off(rows, percentage, args.seed, key=key)
    if not held:
        raise ConfigError(
            f"--validation-split-percentage {percentage} of the {len(rows)} rows of {source} holds out no row; "
            f"pass a percentage of at least {math.ceil(100 / len(rows))} or more training rows."
        )
    return train, held


def choose_template(args, config, train_rows: list[dict], train_source: str):
    """``(template text, config)``. One template, converted from the command line once
    (parse_args): a template method's config holds the same text as the task record, so
    ``pstar eval`` scores the prompt training used. Without ``--template``, a template method's
    comes from the data's text columns and the others' default follows the data's one text column
    (:mod:`pstar_plugins.mechanisms.data_templates`)."""
    from pstar_plugins.mechanisms.data_templates import soft_prompt_template, text_columns, worded_template

    template_field = any(f.name == "template" for f in dataclasses.fields(config))
    if args.template is not None or args.init_from_adapter or "template" in args.method_options:
        return getattr(config, "template", None) or args.template or DEFAULT_TEMPLATE, config
    columns = text_columns(train_rows, _ignored_columns(args))
    if template_field:
        if not columns:
            raise ConfigError(
                f"{train_source} has no text column to build the template from (columns: "
                f"{sorted(train_rows[0])}); pass --template with {{column}} slots and {{soft:N}} tokens."
            )
        built = soft_prompt_template(columns)
        logger.info("template built from the data's text columns %s: %r (set --template to choose)", columns, built)
        return built, config.replace(template=built)
    adapted = default_template_for(DEFAULT_TEMPLATE, train_rows[0], args)
    if len(columns) > 1 and any(f not in train_rows[0] for f in _template_fields(adapted)):
        raise ConfigError(
            f"{train_source} has {len(columns)} text columns {columns}, and the default template "
            f"{DEFAULT_TEMPLATE!r} is worded for one; pass a template that places each, e.g. "
            f"--template '{worded_template(columns)}' (with --label-words for its classes)."
        )
    if adapted != DEFAULT_TEMPLATE:
        logger.info(
            "default template %r adapted to the data's text column: %r (set --template to choose)",
            DEFAULT_TEMPLATE,
            adapted,
        )
    return adapted, config


def _template_fields(text: str) -> list[str]:
    from pstar_plugins.mechanisms.template import Template

    return Template.parse(text).fields


def _ignored_columns(args) -> set[str]:
    """The columns a template does not place: the label (classification) or the target (generation)."""
    return {args.label_column} if args.task == "classification" else {args.target_column}


def default_template_for(text: str, row: dict, args) -> str:
    """A default template whose one text slot names no column of the data, pointed at the
    data's one text column when there is exactly one."""
    from pstar_plugins.mechanisms.data_templates import text_columns
    from pstar_plugins.mechanisms.template import Template

    missing = [f for f in Template.parse(text).fields if f not in row]
    candidates = text_columns([row], _ignored_columns(args))
    if len(missing) == 1 and len(candidates) == 1:
        return text.replace("{" + missing[0] + "}", "{" + candidates[0] + "}")
    return text


def check_template(template, args, train_rows, train_source) -> None:
    if args.model_kind == "causal-lm" or args.task == "generation":
        template.check_answer_last()
    if not template.has_answer:
        raise ConfigError(
            f"template {template.text!r} has no {{answer}} slot; add one at the end, "
            "e.g. --template 'Review: {sentence} Sentiment:{answer}'."
        )
    for name in template.fields:
        if name not in train_rows[0]:
            raise ConfigError(
                f"template slot {{{name}}} is not a column of {train_source} (columns: {sorted(train_rows[0])}); "
                f"rename a column with --column DATA_COLUMN={name}, or change the slot with --template."
            )


def check_room(template, tokenizer, max_length: int) -> None:
    """The template alone (its soft tokens included) must leave room for the example's text."""
    empty = template.encode({name: "" for name in template.fields}, tokenizer, stop_at_answer=True)
    used = len(empty.input_ids)
    if used >= max_length:
        raise ConfigError(
            f"--max-length {max_length} leaves no room for the text: the template {template.text!r} alone "
            f"takes {used} tokens (soft tokens and special tokens included); pass --max-length "
            f"{used + 64} or more, or shorten the template."
        )


DATA_PLAN_FLAGS = ("seed", "max_train_samples", "validation_split_percentage", "select_best")


def data_plan(args) -> dict:
    """The flags that decide which rows of the training file train, which select and whether a best
    state is kept: a checkpoint's row order and best value only mean something under the same ones,
    and two recorded runs were selected on the same rows only when theirs are equal
    (``bench/quality_results.py``)."""
    return {name: getattr(args, name) for name in DATA_PLAN_FLAGS}


def check_same_data_plan(checkpoint: Path, args) -> None:
    """Refuse, before the model loads, to resume a checkpoint written under other data flags."""
    saved = json.loads((checkpoint / "trainer_state.json").read_text()).get("data_plan")
    if saved is None:
        return  # written before checkpoints recorded it
    changed = [name for name in DATA_PLAN_FLAGS if saved.get(name) != getattr(args, name)]
    if changed:
        flags = ", ".join(f"--{n.replace('_', '-')} {saved.get(n)} (now {getattr(args, n)})" for n in changed)
        raise ConfigError(
            f"--resume-from-checkpoint {checkpoint} was written with {flags}: its row order and selection "
            "record belong to those rows; pass the same flags, or start a new run with --overwrite."
        )


def rows_without_limit(args) -> int | None:
    """The training rows the data holds without ``--max-train-samples``, read only to word a
    refusal's advice; ``None`` when they cannot be read (a bad row past the limit is no fault of
    the run, which never reads it)."""
    from pstar_plugins.contract.errors import DataError
    from pstar_plugins.tasks.data import load_split

    try:
        return len(load_split(_train_file(args), args.dataset, args.dataset_config, args.train_split, None, {})[0])
    except DataError:
        return None

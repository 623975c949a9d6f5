"""What a run was asked for, resolved and checked before any model loads: the method and its
config, the learning rate, the data splits, the template, the output folder and the checkpoint
to continue (:class:`Plan`, made by :func:`make_plan`; no torch)."""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path

from pstar_plugins.assembly.registry import get_plugin_manager
from pstar_plugins.contract.errors import ConfigError
from pstar_plugins.contract.spec import MethodConfig, MethodSpec
from pstar_plugins.mechanisms.template import Template
from pstar_plugins.models import check_source
from pstar_plugins.train import run_dir
from pstar_plugins.train.checks import check_batch_fits, data_limits, resolve_schedule
from pstar_plugins.train.cli import TrainConfig
from pstar_plugins.train.data import (
    check_same_data_plan,
    check_template,
    choose_template,
    read_data,
    rows_without_limit,
)
from pstar_plugins.train.tasks import ScriptTask, Split, make_task


def method_config_of(args, spec):
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
        from pstar_plugins.mechanisms.adapter_io import read_adapter

        adapter = read_adapter(args.init_from_adapter)
        meta = adapter[0]
        get_plugin_manager().adapter_method(meta, args.init_from_adapter)  # known before "pass --method" is advised
        if meta["method"] != args.method:
            raise ConfigError(
                f"--init-from-adapter {args.init_from_adapter} holds a {meta['method']!r} adapter, "
                f"but --method is {args.method!r}; pass --method {meta['method']}."
            )
        if args.method_options:
            raise ConfigError(
                f"--init-from-adapter takes the method options from the adapter; drop {sorted(args.method_options)}."
            )
        return spec.config_class.from_saved(meta["method_config"]), adapter  # validated before anything is loaded
    return spec.config_class.from_dict(options), adapter  # validated before anything is loaded or written


@dataclass
class Plan:
    """What a run was asked for, resolved and checked before any model loads."""

    args: TrainConfig  #: the parsed flags (:func:`pstar_plugins.train.cli.parse_args`)
    spec: MethodSpec  #: the method as its plugin registered it
    config: MethodConfig  #: preset, flags and shared task flags, or the saved adapter's
    adapter: tuple[dict, dict] | None  #: (metadata, tensors) of ``--init-from-adapter``
    lr: float  #: ``--learning-rate``, or the method's preset
    out_dir: Path
    run_id: dict[str, str]  #: method, model and training file: what a rerun in the same folder must match
    resume: Path | None  #: the checkpoint to continue from
    template: Template
    task: ScriptTask  #: classification or generation: reading answers, loss, evaluation
    train: Split
    evaluation: Split
    selection: Split | None  #: carved out of the training rows with ``--select-best``


def _check_sizes(args, spec, config) -> None:
    """Options that size tensors against the model's position limit and the memory left, from the
    model's config alone (:mod:`pstar_plugins.train.sizes`); a config that cannot be read is left to the loader."""
    from pstar_plugins.methods.embedding_prompt import EmbeddingPromptMethod
    from pstar_plugins.models import resolve
    from pstar_plugins.train import sizes

    try:
        from transformers import AutoConfig

        path, gguf = resolve(args.model, args.gguf_file)
        model_config = AutoConfig.from_pretrained(path, **({"gguf_file": gguf} if gguf else {}))
    except Exception:  # unreachable hub or an unusual folder: loading reports it
        return
    in_sequence = issubclass(spec.resolve_class(), EmbeddingPromptMethod)
    sizes.check(config, model_config, in_sequence, args.batch_size, args.max_length)


def make_plan(args: TrainConfig) -> Plan:
    """Method and config, data, schedule, template and output folder, all checked (no torch)."""
    spec = get_plugin_manager().method(args.method)
    config, adapter = method_config_of(args, spec)
    lr = args.learning_rate if args.learning_rate is not None else spec.preset.learning_rate
    out_dir = Path(args.output_dir)
    run_dir.check_writable(out_dir)
    train_rows, train_source, eval_rows, eval_source, select_rows, rows_read = read_data(args)
    processes = int(os.environ.get("WORLD_SIZE", "1"))
    task = make_task(args)
    train, evaluation = task.split(train_rows, train_source), task.split(eval_rows, eval_source)
    selection = task.split(select_rows, train_source) if select_rows is not None else None
    template_text, config = choose_template(args, config, train_rows, train_source)
    template = Template.parse(template_text)
    check_template(template, args, train_rows, train_source)
    # the rows one step takes, before the schedule, whose warm-up and epochs count those steps
    needed = args.batch_size * processes
    if len(train_rows) < needed:  # refused below; how many rows the data holds words the advice
        limited = args.max_train_samples is not None and rows_read == args.max_train_samples
        available = rows_without_limit(args) if limited else rows_read
        check_batch_fits(len(train_rows), args.batch_size, processes, data_limits(args, rows_read, available, needed))
    resolve_schedule(args, len(train_rows), processes)
    check_source(args.model, args.model_kind, args.gguf_file, args.task)
    config = task.configure(config)
    _check_sizes(args, spec, config)
    if adapter is not None and spec.config_class.from_saved(adapter[0]["method_config"]) != config:
        raise ConfigError(
            f"--init-from-adapter {args.init_from_adapter} was trained with another number of classes than "
            f"the {len(args.label_words)} --label-words; pass the label words it was trained with."
        )
    resume = run_dir.checkpoint_to_resume(args.resume_from_checkpoint, out_dir)
    if resume is not None:
        run_dir.check_resume(resume, args.method, args.max_steps)
        check_same_data_plan(resume, args)
    run_id = {"method": args.method, "model": args.model, "train_file": train_source}
    return Plan(args, spec, config, adapter, lr, out_dir, run_id, resume, template, task, train, evaluation, selection)

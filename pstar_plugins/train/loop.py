"""Train a P*-tuning method on a frozen model with Accelerate.

    accelerate launch -m pstar_plugins.train --method prompt-tuning \\
        --model smollm2 --output-dir runs/sst2-prompt

The run reads top to bottom in :func:`train`, in the shape of Accelerate's
``examples/nlp_example.py``: set up Accelerate, build the method on the frozen model (or continue
from ``--init-from-adapter``), prepare the model, optimizer and schedule, loop, and finish (final
evaluation, adapter, metrics, plot, summary). What was asked for is resolved and checked before
this module is imported (:mod:`pstar_plugins.train.plan`); what differs between classification
and generation is the task's (:mod:`pstar_plugins.train.tasks`).
"""

from __future__ import annotations

import datetime
import json
import logging
import os
import random
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator, InitProcessGroupKwargs
from accelerate.utils import broadcast_object_list, set_seed
from tqdm.auto import tqdm
from transformers import get_scheduler

from pstar_plugins.assembly.build import build_model, make_optimizer
from pstar_plugins.assembly.loading import load_adapter
from pstar_plugins.assembly.model import PStarModel
from pstar_plugins.contract.capabilities import TokenizerCheck
from pstar_plugins.contract.errors import PStarError
from pstar_plugins.contract.spec import has_classifier_head
from pstar_plugins.mechanisms import distributed
from pstar_plugins.mechanisms.template import Soft, Template
from pstar_plugins.models import load, load_tokenizer, quantization_config
from pstar_plugins.train import run_dir, tracking
from pstar_plugins.train.data import check_room, data_plan
from pstar_plugins.train.plan import Plan
from pstar_plugins.train.report import quiet_third_party, save_record, summary_text, write_plot
from pstar_plugins.train.selection import BEST_ADAPTER, Selection

logger = logging.getLogger("pstar_plugins.train")


def train(plan: Plan) -> int:
    """One run, top to bottom: set up, build or continue, prepare, loop, finish."""
    accelerator = _accelerator(plan.args)
    model, init_gathers = _build_or_continue(plan, accelerator)
    optimizer, scheduler = _optimizer_and_schedule(model, plan, accelerator)
    trainable, frozen = model.parameter_counts()
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    run = _start(plan, accelerator, model, optimizer, scheduler, trainable, frozen, init_gathers)
    if _training_loop(run):
        _finish(run)
    accelerator.end_training()
    distributed.shut_down()
    return 0


@dataclass
class Run:
    """A run in progress: the plan, the prepared model and optimizer, and the loop's state
    (data order, RNG, history, selection), which a checkpoint saves and a resume restores."""

    plan: Plan
    accelerator: Accelerator
    model: torch.nn.Module  #: as Accelerate prepared it (DDP / DeepSpeed engine)
    core: PStarModel  #: the wrapped model inside
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    results: dict[str, Any]  #: what metrics.json records
    chooser: Selection  #: the best state on the selection split
    history: dict[str, list]  #: steps, losses and evaluations, for the plot
    rng: random.Random  #: the data order's
    order: list[int] = field(default_factory=list)  #: rows still to come in this epoch
    start_step: int = 0

    @property
    def args(self):
        return self.plan.args


def _accelerator(args):
    """Accelerate, set up for this launch (one process, DDP or DeepSpeed, with or without GPUs)."""
    quiet_third_party(sys.stderr.isatty())

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
    accelerator = Accelerator(
        kwargs_handlers=handlers,
        step_scheduler_with_optimizer=False,
        cpu=several and no_gpu and not deepspeed,
        **tracking.accelerator_kwargs(args),
    )
    if several and accelerator.distributed_type.value == "NO":
        raise PStarError(
            f"{os.environ.get('WORLD_SIZE')} processes were launched but Accelerate set up no "
            "process group, so gradients would not be synchronised; check the launcher config."
        )
    logging.basicConfig(
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        level=logging.INFO if accelerator.is_main_process else logging.ERROR,
    )
    set_seed(args.seed)
    return accelerator


def _build_or_continue(plan: Plan, accelerator):
    """The frozen model with the method on it: built from the config, or the saved adapter of
    ``--init-from-adapter`` loaded through :func:`load_adapter` (PEFT refuses this, peft#2256).
    Also returns how many gathers the method's initialisation made (rows, never whole matrices)."""

    args, template = plan.args, plan.template
    tokenizer = load_tokenizer(args.model, args.gguf_file)
    check_room(template, tokenizer, args.max_length)
    # before the model loads; an adapter is checked as it will be built (for_loading skips the initialisations)
    config = plan.config if plan.adapter is None else plan.config.for_loading()
    method_class = plan.spec.resolve_class()
    if issubclass(method_class, TokenizerCheck):
        method_class.check_tokenizer(config, tokenizer)
    # every rank loads at the same time: under ZeRO-3 the model is built inside zero.Init, whose
    # parameter partitioning is a collective; main_process_first() here would deadlock
    quantized = quantization_config(args)
    # a quantized model is placed where it is quantized (bitsandbytes packs on the device): this rank's
    placement = {"quantization_config": quantized, "device_map": {"": str(accelerator.device)}} if quantized else {}
    base, tokenizer = load(
        args.model,
        kind=args.model_kind,
        gguf_file=args.gguf_file,
        tokenizer=tokenizer,
        dtype=args.dtype,
        attn_implementation=args.attn_implementation,
        **placement,
    )
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
    plan.task.bind(tokenizer, template, zero_shot_template, accelerator.device, base, has_classifier_head(plan.config))
    for split in (plan.evaluation, plan.selection):
        plan.task.prepare(split)
    return model, init_gathers


def _optimizer_and_schedule(model, plan: Plan, accelerator):
    """AdamW over the plugins' parameter groups, and transformers' schedule (as the Trainer's)."""

    args = plan.args
    optimizer = make_optimizer(model, plan.lr, args.weight_decay)
    scheduler = get_scheduler(
        args.lr_scheduler_type,
        optimizer,
        num_warmup_steps=min(args.warmup_steps, args.max_steps),
        num_training_steps=args.max_steps,
    )
    ds_plugin = getattr(accelerator.state, "deepspeed_plugin", None)
    if ds_plugin is not None:  # we feed batches ourselves, so tell DeepSpeed the micro-batch size
        ds_plugin.deepspeed_config["train_micro_batch_size_per_gpu"] = args.batch_size
        # DeepSpeed clips inside its step; "auto" would become 1.0 whatever --max-grad-norm says
        ds_plugin.deepspeed_config["gradient_clipping"] = args.max_grad_norm
    return optimizer, scheduler


def _start(plan: Plan, accelerator, model, optimizer, scheduler, trainable: int, frozen: int, init_gathers: int) -> Run:
    """The run's record, the tracker, the zero-shot baseline, and the loop's state (fresh or resumed)."""

    args, task, core = plan.args, plan.task, accelerator.unwrap_model(model)
    metric = task.metric_name
    results = {
        "method": args.method,
        "model": args.model,
        "task": args.task,
        "metric": metric,
        "trainable_parameters": trainable,
        "frozen_parameters": frozen,
        "init_gather_calls": init_gathers,
        "train_rows": len(plan.train),
        "selection_rows": len(plan.selection) if plan.selection else 0,
        "evaluation_rows": len(plan.evaluation),
        "max_steps": args.max_steps,
        "expected_examples": plan.spec.preset.expected_examples,
        **task.results_fields(),
        "fast_paths": core.fast_paths.lines(),
    }
    chooser = Selection(keep_best=args.select_best == "best", patience=args.early_stopping_patience)
    run = Run(
        plan,
        accelerator,
        model,
        core,
        optimizer,
        scheduler,
        results,
        chooser,
        {"step": [], "loss": [], "eval_step": [], metric: []},
        random.Random(args.seed),
    )
    # --report-to: the run's configuration (flags, resolved method options, learning rate)
    tracking.start(
        accelerator,
        {
            **vars(args),
            **{f"method.{k}": v for k, v in plan.config.to_dict().items()},
            "learning_rate": plan.lr,
            "trainable_parameters": trainable,
            "processes": accelerator.num_processes,
        },
    )
    if not args.no_zero_shot and not has_classifier_head(plan.config):
        value = task.evaluate(
            core.base_model, plan.evaluation, "zero-shot eval", zero_shot=True, show=accelerator.is_main_process
        )
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
    logger.info(
        "  trainable parameters = %d, frozen = %d (%.4f%%)",
        trainable,
        frozen,
        100 * trainable / max(1, trainable + frozen),
    )
    logger.info(
        "  examples = %d, steps = %d, batch per process = %d, processes = %d, lr = %g",
        len(plan.train),
        args.max_steps,
        args.batch_size,
        run.accelerator.num_processes,
        plan.lr,
    )
    if args.num_train_epochs is not None:
        logger.info("  --num-train-epochs %g: %d steps", args.num_train_epochs, args.max_steps)
    if plan.selection:
        logger.info(
            "  selection split = %d rows, evaluated every %d steps; the adapter saved: %s",
            len(plan.selection),
            args.eval_steps,
            "the best on it" if run.chooser.keep_best else "the last step's",
        )


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

    args, accelerator, out_dir = run.args, run.accelerator, run.plan.out_dir
    ckpt = out_dir / f"checkpoint-{step_done}"
    # the model's state is its adapter (PStarModel.state_dict); DeepSpeed would add every rank's
    # shard of the frozen weights ("frozen_param_fragments") unless told not to
    accelerator.save_state(str(ckpt), exclude_frozen_parameters=True)  # adapter, optimizer, scheduler, RNG
    trainable_state = run.core.trainable_state()  # collective under ZeRO-3: every rank gathers
    if accelerator.is_main_process:
        record = run.plan.task.record()
        run.core.save_adapter(ckpt / "adapter", state=trainable_state, task=record)
        if run.chooser.state is not None:  # the best so far: a resumed run can still end with it
            run.core.save_adapter(ckpt / BEST_ADAPTER, state=run.chooser.state, task=record)
        rng_state = run.rng.getstate()
        payload = {
            "step": step_done,
            "order": run.order,
            "history": run.history,
            "rng": [rng_state[0], list(rng_state[1]), rng_state[2]],
            "data_plan": data_plan(args),
        }
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
    return run.plan.train.take(chosen[rank * args.batch_size : (rank + 1) * args.batch_size])


def _training_loop(run: Run) -> bool:
    """Train to --max-steps (or an early stop); False when --stop-after-steps left early."""

    args, accelerator, model = run.args, run.accelerator, run.model
    clip = args.max_grad_norm and getattr(accelerator.state, "deepspeed_plugin", None) is None
    model.train()
    interactive = sys.stderr.isatty()
    # a terminal gets a progress bar; a log file one line per --logging-steps, not carriage returns
    progress = tqdm(
        range(run.start_step, args.max_steps),
        desc="training",
        disable=not (accelerator.is_main_process and interactive),
    )
    for step in progress:
        loss = run.plan.task.loss(model, *_next_rows(run))
        if not torch.isfinite(loss):
            raise PStarError(
                f"loss became {loss.item()} at step {step + 1}; lower --learning-rate. Checkpoints so far are kept."
            )
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
            logger.info(
                "stopping after %d steps in this run (--stop-after-steps); resume with --resume-from-checkpoint latest",
                args.stop_after_steps,
            )
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
        if (
            accelerator.num_processes > 1
        ):  # one decision for every rank: keeping the best state is a collective under ZeRO-3
            value = broadcast_object_list([value])[0]
        improved = run.chooser.record(step, value, run.core.trainable_state)  # a collective under ZeRO-3: every rank
        run.history["eval_step"].append(step)
        run.history[metric].append(value)
        tracking.log(accelerator, {f"selection/{metric}": value}, step=step)
        logger.info(
            "step %d: loss %.4f, selection %s %.4f%s",
            step,
            loss_value,
            metric,
            value,
            " (best so far)" if improved else f" (best {run.chooser.best_value:.4f} at step {run.chooser.best_step})",
        )
    elif not plan.selection and step % args.eval_steps == 0 and step < args.max_steps:
        value = plan.task.evaluate(scoring, plan.evaluation, "eval", limit=args.eval_subset_size, show=show)
        run.history["eval_step"].append(step)
        run.history[metric].append(value)
        tracking.log(accelerator, {f"eval/{metric}": value}, step=step)
        logger.info(
            "step %d: loss %.4f, dev %s %.4f (first %d)", step, loss_value, metric, value, args.eval_subset_size
        )
    if run.chooser.should_stop:
        logger.info(
            "early stop at step %d: %d selection evaluations without improvement (--early-stopping-patience)",
            step,
            run.chooser.without_improvement,
        )
        run.results["early_stopped_at"] = step
        return True
    return False


def _finish(run: Run) -> None:
    """The final evaluation (of the best state, with --select-best best), the adapter, metrics.json,
    the plot and the summary."""

    args, plan, accelerator, core, results, history = (
        run.args,
        run.plan,
        run.accelerator,
        run.core,
        run.results,
        run.history,
    )
    metric, out_dir = plan.task.metric_name, plan.out_dir
    steps_done = history["step"][-1] if history["step"] else run.start_step
    results.update(steps=steps_done, examples_seen=steps_done * args.batch_size * accelerator.num_processes)
    if plan.selection:
        results["selection"] = run.chooser.report(metric, len(plan.selection))
    if run.chooser.state is not None:  # every rank: the load is collective under ZeRO-3
        core.load_trainable_state(run.chooser.state)
        logger.info(
            "final evaluation with the best state on the selection split: step %d (%s %.4f)",
            run.chooser.best_step,
            metric,
            run.chooser.best_value,
        )
    scoring = plan.task.evaluation_model(run.model, core)
    started = time.perf_counter()
    results[f"tuned_{metric}"] = plan.task.evaluate(
        scoring, plan.evaluation, "final eval", show=accelerator.is_main_process
    )
    results["final_eval_seconds"] = time.perf_counter() - started  # every rank scores its share (train.tasks)
    history["eval_step"].append(steps_done)
    history[metric].append(results[f"tuned_{metric}"])
    tracking.log(accelerator, {f"eval/{metric}": results[f"tuned_{metric}"]}, step=steps_done)
    started = time.perf_counter()
    with distributed.recording_gathers() as save_calls:
        state = core.trainable_state()  # collective under ZeRO-3: only the method's partitions
    results["save"] = save_record(core, state, save_calls)
    if accelerator.is_main_process:
        core.save_adapter(out_dir / "adapter", state=state, task=plan.task.record())
        results["save"]["seconds"] = time.perf_counter() - started
        results["history"] = history
        (out_dir / "metrics.json").write_text(json.dumps(results, indent=2))
        if args.plot:
            write_plot(
                history,
                out_dir / args.plot,
                args.method,
                metric,
                args.eval_subset_size,
                periodic_on_selection=bool(plan.selection),
            )
        written = [out_dir / "adapter", out_dir / "metrics.json"]
        if args.plot and (out_dir / args.plot).is_file():
            written.append(out_dir / args.plot)
        written += run_dir.complete_checkpoints(out_dir)
        print(summary_text(args, results, metric, written))

"""Model selection on a split of the training rows (--validation-split-percentage, --select-best,
--early-stopping-patience), schedules by data size (--num-train-epochs, --warmup-ratio) and the
default templates built from the data's text columns."""

import json
import os
import subprocess
import sys
from argparse import Namespace
from pathlib import Path

import pytest

from pstar_plugins.mechanisms.data_templates import soft_prompt_template, text_columns, worded_template
from pstar_plugins.train.checks import resolve_schedule
from pstar_plugins.train.cli import parse_args
from pstar_plugins.train.data import choose_template
from pstar_plugins.train.selection import Selection, split_off

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT), "PSTAR_DISABLE_PLUGIN_AUTOLOAD": "1"}
RTE_ROW = {
    "sentence1": "No Weapons of Mass Destruction Found in Iraq Yet.",
    "sentence2": "Weapons Found in Iraq.",
    "label": 1,
    "idx": 0,
}


def test_the_selection_split_is_seeded_disjoint_and_keeps_the_files_order():
    rows = list(range(50))
    train, held = split_off(rows, 10, seed=42)
    assert len(held) == 5 and len(train) == 45
    assert sorted(train + held) == rows and train == sorted(train) and held == sorted(held)
    assert split_off(rows, 10, seed=42) == (train, held)  # deterministic for a seed
    assert split_off(rows, 10, seed=7)[1] != held


def test_selection_keeps_the_first_best_state_and_counts_evaluations_without_improvement():
    states = iter([{"w": __import__("torch").tensor([float(i)])} for i in range(10)])
    calls = []

    def current():
        calls.append(1)
        return next(states)

    chosen = Selection(keep_best=True, patience=2)
    assert chosen.record(2, 0.5, current) and chosen.record(4, 0.7, current)
    assert not chosen.record(6, 0.7, current)  # a tie is no improvement: the earlier step is kept
    assert not chosen.should_stop
    assert not chosen.record(8, 0.6, current)
    assert chosen.should_stop and len(calls) == 2  # the state is read only when the value improves
    assert (chosen.best_step, chosen.best_value, chosen.last_step, chosen.last_value) == (4, 0.7, 8, 0.6)
    assert float(chosen.state["w"]) == 1.0
    assert chosen.report("accuracy", 30) == {
        "metric": "accuracy",
        "rows": 30,
        "select": "best",
        "best_step": 4,
        "best_accuracy": 0.7,
        "last_step": 8,
        "last_accuracy": 0.6,
        "evaluations_without_improvement": 2,
    }
    assert Selection(keep_best=False).record(2, 0.5, lambda: pytest.fail("read without --select-best best")) is True


@pytest.mark.parametrize(
    "flags, rows, processes, steps, warmup",
    [
        ([], 2000, 1, 100, 10),  # today's defaults
        (["--max-steps", "4"], 2000, 1, 4, 4),
        (["--num-train-epochs", "2"], 2000, 1, 250, 10),  # ceil(2000 / 16) = 125 steps an epoch
        (["--num-train-epochs", "1", "--batch-size", "7"], 100, 2, 8, 8),  # ceil(100 / 14) = 8
        (["--num-train-epochs", "0.5", "--warmup-ratio", "0.1"], 2000, 1, 63, 7),  # both rounded up
        (["--max-steps", "100", "--warmup-ratio", "0"], 2000, 1, 100, 0),
    ],
)
def test_steps_and_warmup_follow_the_data_size(flags, rows, processes, steps, warmup):
    args = parse_args(["--method", "prompt-tuning", "--output-dir", "unused", *flags])
    resolve_schedule(args, rows, processes)
    assert (args.max_steps, args.warmup_steps) == (steps, warmup)


def test_text_columns_skip_the_label_numbers_and_ids():
    assert text_columns([RTE_ROW], {"label"}) == ["sentence1", "sentence2"]
    tsv_rows = [{"idx": str(i), "sentence": f"text {i}", "label": "1"} for i in range(3)]  # a TSV: every value a string
    assert text_columns(tsv_rows, {"label"}) == ["sentence"]
    assert text_columns([{"mr": "name[x]", "ref": "X is."}], {"ref"}) == ["mr"]


def _pairs_args(method, *flags):
    return parse_args(
        [
            "--method",
            method,
            "--output-dir",
            "unused",
            "--train-file",
            "t.jsonl",
            "--validation-file",
            "v.jsonl",
            *flags,
        ]
    )


def test_a_template_method_gets_soft_tokens_around_each_text_column():
    from pstar_plugins.assembly.registry import get_plugin_manager
    from pstar_plugins.train.plan import method_config_of

    args = _pairs_args("p-tuning")
    config, _ = method_config_of(args, get_plugin_manager().method("p-tuning"))
    text, config = choose_template(args, config, [RTE_ROW], "pairs.jsonl")
    assert text == config.template == "{soft:3} {sentence1} {soft:3} {sentence2} {soft:3}{answer}"
    assert soft_prompt_template(["sentence"]) == "{soft:3} {sentence} {soft:3}{answer}"
    given = _pairs_args("p-tuning", "--template", "{soft:2} {sentence1} / {sentence2}{answer}")
    config, _ = method_config_of(given, get_plugin_manager().method("p-tuning"))
    assert choose_template(given, config, [RTE_ROW], "pairs.jsonl")[0] == "{soft:2} {sentence1} / {sentence2}{answer}"


def test_the_worded_default_follows_one_text_column_and_its_suggestion_for_several_parses():
    from pstar_plugins.assembly.registry import get_plugin_manager
    from pstar_plugins.mechanisms.template import Template, from_command_line
    from pstar_plugins.train.plan import method_config_of

    args = _pairs_args("prompt-tuning")
    config, _ = method_config_of(args, get_plugin_manager().method("prompt-tuning"))
    assert (
        choose_template(args, config, [{"text": "fine", "label": "1"}], "x.tsv")[0]
        == "Review: {text} Sentiment:{answer}"
    )
    assert (
        choose_template(args, config, [{"sentence": "fine", "label": "1"}], "x.tsv")[0]
        == "Review: {sentence} Sentiment:{answer}"
    )
    suggested = Template.parse(from_command_line(worded_template(["sentence1", "sentence2"])))
    assert suggested.fields == ["sentence1", "sentence2"] and suggested.has_answer
    assert suggested.text == "sentence1: {sentence1}\nsentence2: {sentence2}\nAnswer:{answer}"


def _run(tiny_dir, out, *extra):
    command = [
        sys.executable,
        "-m",
        "pstar_plugins.train",
        "--model",
        str(tiny_dir),
        "--output-dir",
        str(out),
        "--method",
        "prompt-tuning",
        "--num-virtual-tokens",
        "2",
        "--batch-size",
        "2",
        "--max-train-samples",
        "40",
        "--max-eval-samples",
        "8",
        "--eval-steps",
        "2",
        "--no-zero-shot",
        "--plot",
        "",
        "--learning-rate",
        "0.3",
        "--validation-split-percentage",
        "25",
        *extra,
    ]
    result = subprocess.run(command, capture_output=True, text=True, env=ENV, cwd=ROOT, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def _tensors(adapter: Path):
    from safetensors.torch import load_file

    return load_file(str(adapter / "adapter.safetensors"))


@pytest.mark.slow
def test_select_best_saves_the_best_steps_state_and_a_resumed_run_ends_with_the_same(tiny_dir, tmp_path):
    import torch

    flags = ("--num-train-epochs", "0.4", "--select-best", "best", "--checkpointing-steps", "2")  # 6 steps
    whole = _run(tiny_dir, tmp_path / "whole", *flags)
    metrics = json.loads((tmp_path / "whole" / "metrics.json").read_text())
    chosen = metrics["selection"]
    assert (metrics["train_rows"], metrics["selection_rows"], metrics["steps"], metrics["examples_seen"]) == (
        30,
        10,
        6,
        12,
    )
    assert chosen["last_step"] == 6 and chosen["best_step"] in (2, 4, 6)
    assert metrics["history"]["eval_step"] == [2, 4, 6, 6]  # three on the selection split, then the final one
    best = _tensors(tmp_path / "whole" / f"checkpoint-{chosen['best_step']}" / "adapter")
    saved = _tensors(tmp_path / "whole" / "adapter")
    assert all(torch.equal(saved[k], best[k]) for k in best)
    if chosen["best_step"] != 6:  # then the last step's state is another one, and was not saved
        last = _tensors(tmp_path / "whole" / "checkpoint-6" / "adapter")
        assert not all(torch.equal(saved[k], last[k]) for k in last)
    assert (
        f"selection split        : 10 rows; best accuracy {chosen['best_accuracy']:.4f} at step {chosen['best_step']}"
        in whole.stdout
    )
    assert "6 steps, 12 examples seen (30 training rows)" in whole.stdout

    _run(tiny_dir, tmp_path / "part", *flags, "--stop-after-steps", "3")
    assert (tmp_path / "part" / "checkpoint-3" / "best-adapter").is_dir() and not (
        tmp_path / "part" / "adapter"
    ).exists()
    _run(tiny_dir, tmp_path / "part", *flags, "--resume-from-checkpoint", "latest")
    resumed = json.loads((tmp_path / "part" / "metrics.json").read_text())
    from pstar_plugins.mechanisms.adapter_io import read_adapter

    (meta, ended), (meta_whole, ended_whole) = (
        read_adapter(tmp_path / "part" / "adapter"),
        read_adapter(tmp_path / "whole" / "adapter"),
    )
    assert meta == meta_whole and ended.keys() == ended_whole.keys()
    assert all(torch.equal(ended[k], ended_whole[k]) for k in ended)  # the safetensors header's key order may differ
    assert resumed["selection"] == chosen and resumed["tuned_accuracy"] == metrics["tuned_accuracy"]


@pytest.mark.slow
def test_early_stopping_ends_the_run_after_patience_evaluations_without_improvement(tiny_dir, tmp_path):
    result = _run(
        tiny_dir, tmp_path / "run", "--max-steps", "40", "--early-stopping-patience", "1", "--eval-steps", "1"
    )
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    chosen = metrics["selection"]
    stopped = metrics["early_stopped_at"]
    assert stopped < 40 and metrics["steps"] == stopped == chosen["last_step"]
    assert chosen["evaluations_without_improvement"] == 1 and chosen["select"] == "last"
    values = metrics["history"]["accuracy"][:-1]  # one selection evaluation a step, then the final one
    assert len(values) == stopped and values[-1] <= max(values[:-1])
    assert all(values[i] > max(values[:i]) for i in range(1, stopped - 1))  # every earlier one improved
    assert f"early stop at step {stopped}" in result.stderr


def test_a_generation_split_keeps_every_source_on_one_side():
    from pstar_plugins.train.data import split_held_out

    rows = [{"mr": f"name[{i % 7}]", "ref": f"text {i}"} for i in range(70)]  # 7 sources, 10 references each
    args = Namespace(validation_split_percentage=30, seed=42, task="generation", target_column="ref")
    train, held = split_held_out(rows, "e2e", args)
    assert {r["mr"] for r in train}.isdisjoint({r["mr"] for r in held})
    assert len({r["mr"] for r in held}) == 2 and len(held) == 20  # 30% of the 7 sources, all their rows
    # classification keeps the row split
    assert split_held_out(
        rows, "x", Namespace(validation_split_percentage=30, seed=42, task="classification", target_column="ref")
    ) == split_off(rows, 30, 42)


def test_a_resume_under_other_data_flags_is_refused_before_the_model_loads(tmp_path):
    from pstar_plugins.contract.errors import ConfigError
    from pstar_plugins.train.data import check_same_data_plan, data_plan

    args = Namespace(seed=42, max_train_samples=None, validation_split_percentage=10, select_best="last")
    checkpoint = tmp_path / "checkpoint-4"
    checkpoint.mkdir()
    (checkpoint / "trainer_state.json").write_text(json.dumps({"step": 4, "data_plan": data_plan(args)}))
    check_same_data_plan(checkpoint, args)  # the same flags: accepted
    changed = Namespace(**{**vars(args), "seed": 7, "select_best": "best"})
    with pytest.raises(ConfigError, match=r"written with --seed 42 \(now 7\), --select-best last \(now best\)"):
        check_same_data_plan(checkpoint, changed)


def test_a_selection_split_that_is_never_evaluated_is_refused():
    from pstar_plugins.contract.errors import ConfigError

    with pytest.raises(ConfigError, match="--validation-split-percentage 10 with --eval-steps 0 would hold out"):
        parse_args(
            [
                "--method",
                "prompt-tuning",
                "--train-file",
                "t.tsv",
                "--validation-file",
                "v.tsv",
                "--validation-split-percentage",
                "10",
                "--eval-steps",
                "0",
                "--output-dir",
                "o",
            ]
        )

"""`pstar eval`: an adapter remembers the task it was trained for, and generation is scored with
BLEU and ROUGE-L from a base model (zero- and few-shot) or from a tuned adapter."""

import argparse
import json
import os
import subprocess
import sys

import pytest

from pstar_plugins import build_model
from pstar_plugins.contract.errors import AdapterError, ConfigError, DataError
from pstar_plugins.evaluate import CLASSIFICATION_TEMPLATE, parse_args, resolve_task
from pstar_plugins.mechanisms.adapter_io import read_adapter
from pstar_plugins.mechanisms.template import Template
from pstar_plugins.tasks.generation import group_references
from pstar_plugins.testing import tiny_model
from tests.test_train_entry_point import ROOT, _train, needs_model

RECORDED = {
    "kind": "classification",
    "template": "Film: {sentence}\nVerdict:{answer}",
    "max_length": 96,
    "label_words": ["bad", "good"],
    "label_column": "stars",
}


def _resolved(argv, recorded=None) -> argparse.Namespace:
    args = parse_args(argv)
    resolve_task(args, recorded)
    return args


def test_flags_left_unset_come_from_the_adapters_recorded_task():
    args = _resolved(["--adapter", "x"], RECORDED)
    assert (args.task, args.template, args.label_words, args.label_column, args.max_length) == (
        "classification",
        RECORDED["template"],
        ["bad", "good"],
        "stars",
        96,
    )


def test_flags_given_override_the_recorded_task_and_escapes_are_read():
    args = _resolved(
        ["--template", "T: {sentence}\\nA:{answer}", "--label-words", "no", "yes", "--max-length", "64"], RECORDED
    )
    assert (args.template, args.label_words, args.label_column, args.max_length) == (
        "T: {sentence}\nA:{answer}",
        ["no", "yes"],
        "stars",
        64,
    )


def test_without_a_recorded_task_the_defaults_are_the_sst2_ones():
    args = _resolved([])
    assert (args.task, args.template, args.label_words, args.label_column, args.max_length) == (
        "classification",
        CLASSIFICATION_TEMPLATE,
        ["negative", "positive"],
        "label",
        1024,
    )


def test_a_recorded_task_of_another_kind_is_not_used():
    recorded = {
        "kind": "generation",
        "template": "Data: {mr}\nText:{answer}",
        "target_column": "text",
        "max_new_tokens": 20,
    }
    args = _resolved(["--task", "classification"], recorded)
    assert (args.template, args.target_column, args.max_new_tokens) == (CLASSIFICATION_TEMPLATE, "ref", 64)
    args = _resolved([], recorded)
    assert (args.task, args.template, args.target_column, args.max_new_tokens) == (
        "generation",
        recorded["template"],
        "text",
        20,
    )


@pytest.mark.parametrize(
    "argv, names",
    [
        (["--task", "generation"], ["--template", "{answer}"]),
        (["--task", "generation", "--template", "D: {mr} T:{answer}", "--calibrate"], ["--calibrate"]),
        (["--task", "generation", "--template", "D: {mr} T:{answer}", "--model-kind", "masked-lm"], ["causal-lm"]),
        (
            ["--task", "generation", "--template", "D: {mr} T:{answer}", "--shots", "0", "2"],
            ["--shots 0 2", "--demonstration-file"],
        ),
    ],
)
def test_generation_settings_that_cannot_work_are_refused_with_the_fix(argv, names):
    with pytest.raises(ConfigError) as err:
        _resolved(argv)
    assert all(n in str(err.value) for n in names)


def test_a_missing_target_column_names_the_row_and_the_flag():
    rows = [{"mr": "a", "ref": "x"}, {"mr": "b", "text": "y"}]
    with pytest.raises(DataError, match=r"row 2 has no target column 'ref'.*--target-column"):
        group_references(rows, Template.parse("D: {mr} T:{answer}"), "ref")


def test_the_recorded_task_round_trips_and_a_malformed_one_is_refused(tmp_path):
    model = build_model(tiny_model("llama"), "prompt-tuning", init="random")
    model.save_adapter(tmp_path / "ok", task=RECORDED)
    assert read_adapter(tmp_path / "ok")[0]["task"] == RECORDED
    model.save_adapter(tmp_path / "bad", task={"kind": "regression", "template": "x"})
    with pytest.raises(AdapterError, match="'regression'"):
        read_adapter(tmp_path / "bad")
    model.save_adapter(tmp_path / "none")
    assert "task" not in read_adapter(tmp_path / "none")[0]


def _eval(*argv):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    return subprocess.run(
        [sys.executable, "-m", "pstar_plugins.cli", "eval", *argv], capture_output=True, text=True, env=env, cwd=ROOT
    )


@pytest.mark.slow
@needs_model
def test_eval_of_a_trained_adapter_uses_its_template_and_label_words(tiny_dir, tmp_path):
    template = "Film: {sentence} Verdict:{answer}"
    result = _train(
        tiny_dir,
        tmp_path / "run",
        "--method",
        "prompt-tuning",
        "--template",
        template,
        "--label-words",
        "bad",
        "good",
        "--max-eval-samples",
        "32",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    out = tmp_path / "eval.json"
    result = _eval(
        "--model",
        str(tiny_dir),
        "--adapter",
        str(tmp_path / "run" / "adapter"),
        "--max-eval-samples",
        "32",
        "--output",
        str(out),
    )
    assert result.returncode == 0, result.stderr[-3000:]
    evaluated = json.loads(out.read_text())
    assert (evaluated["template"], evaluated["label_words"]) == (template, ["bad", "good"])
    assert evaluated["runs"][0]["accuracy"] == metrics["tuned_accuracy"]
    # the fast paths of the adapter's model, decided as at training and shown beside the scores
    assert evaluated["runs"][0]["fast_paths"] == metrics["fast_paths"]
    assert "fast paths of adapter prompt-tuning:\n  packing: applies" in result.stdout


@pytest.mark.slow
@needs_model
def test_eval_generation_from_an_adapter_and_from_the_base_with_demonstrations(tiny_dir, tmp_path):
    train, dev = tmp_path / "train.csv", tmp_path / "dev.csv"
    train.write_text(
        'mr,text\n"name[A], food[Thai]","A serves Thai food."\n"name[B], area[riverside]","B is by the river."\n' * 4
    )
    dev.write_text(
        'mr,text\n"name[C], food[Thai]","C serves Thai food."\n"name[C], food[Thai]","Thai food at C."\n'
        '"name[D], area[centre]","D is central."\n'
    )
    result = _train(
        tiny_dir,
        tmp_path / "run",
        "--task",
        "generation",
        "--method",
        "prefix-tuning",
        "--train-file",
        str(train),
        "--validation-file",
        str(dev),
        "--template",
        "Data: {mr}\\nText:{answer}",
        "--target-column",
        "text",
        "--max-new-tokens",
        "6",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    trained = json.loads((tmp_path / "run" / "metrics.json").read_text())["generation_scores"]["final eval"]

    # the adapter alone says it is a generation adapter, with its template, target column and length
    out = tmp_path / "adapter.json"
    result = _eval(
        "--model",
        str(tiny_dir),
        "--adapter",
        str(tmp_path / "run" / "adapter"),
        "--validation-file",
        str(dev),
        "--output",
        str(out),
    )
    assert result.returncode == 0, result.stderr[-3000:]
    evaluated = json.loads(out.read_text())
    assert (evaluated["task"], evaluated["template"], evaluated["sources"]) == (
        "generation",
        "Data: {mr}\nText:{answer}",
        2,
    )
    run = evaluated["runs"][0]
    assert run["example"] == trained["example"][:3]  # the same greedy continuations as training's final evaluation
    assert (run["bleu"], run["rouge_l"]) == (trained["bleu"], trained["rouge_l"])
    assert "BLEU" in result.stdout and "ROUGE-L" in result.stdout

    out = tmp_path / "base.json"
    result = _eval(
        "--model",
        str(tiny_dir),
        "--task",
        "generation",
        "--template",
        "Data: {mr}\\nText:{answer}",
        "--target-column",
        "text",
        "--validation-file",
        str(dev),
        "--demonstration-file",
        str(train),
        "--shots",
        "0",
        "1",
        "--seeds",
        "2",
        "--max-new-tokens",
        "4",
        "--output",
        str(out),
    )
    assert result.returncode == 0, result.stderr[-3000:]
    runs = json.loads(out.read_text())["runs"]
    assert [(r["shots"], r["seeds"]) for r in runs] == [(0, 1), (1, 2)]
    assert all(
        0 <= r["bleu"] <= 100 and 0 <= r["rouge_l"] <= 100 and len(r["per_seed_bleu"]) == r["seeds"] for r in runs
    )

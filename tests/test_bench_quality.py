"""The quality benchmark's rules and records: which recorded rows count toward the targets and
whether those are met (``bench/quality_results.py``), how rows recorded in older layouts read,
docs/quality.md's table against the committed record, and the launcher's commands
(``bench/quality.py``) as ``pstar train`` and ``pstar eval`` read them."""

import json
import shlex
import statistics
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import quality  # noqa: E402
import quality_results as R  # noqa: E402

SST2_TARGET = "sst2_mean_of_seeds_at_least_0.88"
RTE_TARGET = "rte_best_method_at_least_zero_shot_plus_5_and_best_icl"
E2E_TARGET = "e2e_prefix_tuning_bleu_at_least_k_shot"
MINILM_TARGET = "minilm_within_2_points"
RULE = "best mean selection accuracy of the kept states, on the target's selection splits"
SENTENCES = "runs/bench-quality/sst2-train-sentences.tsv"
PHRASES = "../shared/data/sst2/train.tsv"


def _command(
    seed,
    *extra,
    method="prompt-tuning",
    train=SENTENCES,
    selecting="--validation-split-percentage 10 --select-best best",
):
    """A pstar train command as the sst2-seeds part records it; ``extra`` flags at its end."""
    return shlex.join(
        [
            "accelerate",
            "launch",
            "--num_processes",
            "1",
            "-m",
            "pstar_plugins.train",
            "--method",
            method,
            "--model",
            "smollm2",
            "--train-file",
            train,
            "--validation-file",
            "pstar_plugins/data/sst2_dev.tsv",
            *shlex.split(selecting),
            "--max-steps",
            "300",
            "--output-dir",
            f"runs/bench-quality/{method}-{seed}",
            "--overwrite",
            "--seed",
            str(seed),
            *extra,
        ]
    )


def _seeds(dev, selection, *extra, method="prompt-tuning", seeds=(1, 2, 3), **command):
    """An ``sst2_seeds`` record of ``method`` over ``seeds``: each run's dev accuracy ``dev`` and the
    selection accuracy of its kept state (``selection``, one per seed; ``None``: not recorded)."""
    runs = [
        {
            "seed": seed,
            "accuracy": dev,
            "command": _command(seed, *extra, method=method, **command),
            **({"selection_accuracy": value} if value is not None else {}),
        }
        for seed, value in zip(seeds, selection)
    ]
    return {
        "method": method,
        "steps": 300,
        "batch_size": 16,
        "options": [],
        "selection_percentage": 10,
        "seeds": list(seeds),
        "accuracy": dev,
        "accuracy_std": 0.0,
        "runs": runs,
    }


def _rte(best_method=0.62, zero=0.52, calibrated=0.57, icl=0.55):
    """RTE prompting rows (the best zero-shot one calibrated) and two methods of one run each."""
    return {
        "rte_prompting": {
            "runs": [
                {"name": "0-shot", "shots": 0, "seeds": 1, "accuracy": zero},
                {"name": "4-shot", "shots": 4, "seeds": 3, "accuracy": icl, "accuracy_std": 0.02},
                {"name": "0-shot calibrated", "shots": 0, "seeds": 1, "accuracy": calibrated},
            ]
        },
        "rte_methods": {"prompt-tuning": {"accuracy": best_method}, "p-tuning-v2": {"accuracy": 0.5}},
    }


def _e2e(prefix_bleu):
    return {
        "e2e": {"prefix-tuning": {"bleu": prefix_bleu}, "prompt-tuning": {"bleu": 40.0}},
        "e2e_prompting": {
            "runs": [{"name": "0-shot", "shots": 0, "bleu": 10.0}, {"name": "2-shot", "shots": 2, "bleu": 50.0}]
        },
    }


def _minilm(gap):
    return {"steps": 1800, "batch_size": 16, "gap_points": gap}


# ------------------------------------------------------------------------------ the rules


def test_each_target_is_met_at_its_threshold_and_unmet_below_it():
    def met(record, name):
        return R.targets(record)[name]["met"]

    assert met({"sst2_seeds": {"sentences": {"prompt-tuning": _seeds(0.88, [0.9] * 3)}}}, SST2_TARGET) is True
    assert met({"sst2_seeds": {"sentences": {"prompt-tuning": _seeds(0.8799, [0.9] * 3)}}}, SST2_TARGET) is False
    # RTE: 5 points above the best zero-shot row, the calibrated 57.0, and at least the best in-context row
    assert met(_rte(best_method=0.62), RTE_TARGET) is True
    assert met(_rte(best_method=0.619), RTE_TARGET) is False
    assert met(_rte(best_method=0.59, zero=0.4, calibrated=0.4, icl=0.6), RTE_TARGET) is False  # below in-context
    assert R.targets(_rte())[RTE_TARGET]["best_zero_shot"] == {"name": "0-shot calibrated", "accuracy": 0.57}
    assert R.targets(_e2e(50.0))[E2E_TARGET] == {
        "prefix_tuning_bleu": 50.0,
        "prompting": "2-shot",
        "prompting_bleu": 50.0,
        "met": True,
    }
    assert met(_e2e(49.9), E2E_TARGET) is False
    assert met({"minilm": {"phrases": _minilm(2.0)}}, MINILM_TARGET) is True
    assert met({"minilm": {"phrases": _minilm(2.5)}}, MINILM_TARGET) is False


def test_targets_wait_for_the_parts_they_need():
    assert set(R.targets({"rte_methods": _rte()["rte_methods"], "e2e": _e2e(50.0)["e2e"]}).values()) == {None}


def test_the_rte_target_counts_a_methods_seed_mean_and_its_longer_runs_but_never_the_reference():
    record = {
        **_rte(best_method=0.58),
        "rte_methods": {"prompt-tuning": {"accuracy": 0.58}, "p-tuning-v2": {"accuracy": 0.64}},
        "rte_seeds": {"p-tuning-v2": {"accuracy": 0.60, "seeds": [1, 2, 3], "accuracy_std": 0.01}},
        "rte_longer": {"p-tuning-v2, 4 epochs": {"accuracy": 0.59, "epochs": 4.0}},
        "rte_reference": {"full fine-tuning": {"accuracy": 0.70}},
    }
    target = R.targets(record)[RTE_TARGET]
    # p-tuning-v2's one run scored 64.0, but its mean over seeds (60.0) is what counts; the reference's 70.0 never does
    assert (target["method"], target["accuracy"], target["seeds"], target["met"]) == (
        "p-tuning-v2",
        0.60,
        [1, 2, 3],
        False,
    )
    record["rte_longer"]["p-tuning-v2, 4 epochs"]["accuracy"] = 0.63  # a longer run is a row of its own
    target = R.targets(record)[RTE_TARGET]
    assert (target["method"], target["accuracy"], "seeds" in target, target["met"]) == (
        "p-tuning-v2, 4 epochs",
        0.63,
        False,
        True,
    )


def test_of_the_methods_on_the_targets_rows_the_best_on_the_selection_splits_counts_not_the_best_on_dev():
    prompt = _seeds(0.879, [0.890, 0.891, 0.889])
    prefix = _seeds(0.881, [0.889, 0.890, 0.888], method="prefix-tuning")  # better on dev, worse on selection
    rows, counted, choice = R.counted_seeds({"sentences": {"prefix-tuning": prefix, "prompt-tuning": prompt}})
    assert (rows, counted) == ("sentences", prompt)
    assert choice == {"rule": RULE, "candidates": pytest.approx({"prefix-tuning": 0.889, "prompt-tuning": 0.890})}
    target = R.targets({"sst2_seeds": {"sentences": {"prefix-tuning": prefix, "prompt-tuning": prompt}}})[SST2_TARGET]
    assert (target["method"], target["accuracy"], target["met"]) == ("prompt-tuning", 0.879, False)
    # equal numbers of correct selection rows tie, whatever the last bit of their float; the first recorded wins
    first = dict(prompt, selection_accuracy=statistics.mean(k / 688 for k in (627, 616, 627)))
    tie = dict(prefix, selection_accuracy=sum([627, 620, 623]) / 3 / 688)
    assert first["selection_accuracy"] != tie["selection_accuracy"]
    assert R.counted_seeds({"sentences": {"prompt-tuning": first, "prefix-tuning": tie}})[1] is first
    assert R.counted_seeds({"sentences": {"prefix-tuning": tie, "prompt-tuning": first}})[1] is tie


def test_records_run_off_the_targets_rows_never_compete_whatever_their_fields_say():
    counted = _seeds(0.88, [0.88] * 3)
    # each trained, selected or scored on other rows, or kept another state, as its commands say;
    # its own fields (seeds 1, 2, 3; 10%) are copied from the counted record and must not decide
    outside = {
        "one-seed": _seeds(0.99, [0.99], seeds=(1,)),
        "other-seeds": _seeds(0.99, [0.99] * 3, seeds=(4, 5, 6)),
        "cut-rows": _seeds(0.99, [0.99] * 3, "--max-train-samples=3000"),
        "percentage-twice": _seeds(0.99, [0.99] * 3, "--validation-split-percentage", "20"),  # the last one holds
        "last-state": _seeds(0.99, [0.99] * 3, "--select-best", "last"),
        "no-selection-split": _seeds(0.99, [0.99] * 3, selecting=""),
        "other-train-file": _seeds(0.99, [0.99] * 3, train="pstar_plugins/data/sst2_train_sample.tsv"),
        "other-dev-file": _seeds(0.99, [0.99] * 3, "--validation-file", "easy_dev.tsv"),
        "cut-dev": _seeds(0.99, [0.99] * 3, "--max-eval-samples", "50"),
        "other-model": _seeds(0.99, [0.99] * 3, "--model", "gpt2"),
    }
    for name, record in outside.items():
        record = dict(counted, runs=record["runs"])
        _, chosen, choice = R.counted_seeds({"sentences": {name: record, "prompt-tuning": counted}})
        assert (chosen, choice) == (
            counted,
            {"rule": RULE, "candidates": {"prompt-tuning": 0.88}, "other_splits": [name]},
        ), name
    # a command pstar train would refuse says nothing about its rows
    broken = _seeds(0.99, [0.99] * 3, "--seed", "one")
    assert R.counted_seeds({"sentences": {"broken": broken, "prompt-tuning": counted}})[2]["unreadable"] == ["broken"]
    # a plugin module adds methods, not rows: it is not imported, and flags the reader does not know are left alone
    plugged = _seeds(0.88, [0.88] * 3, "-p", "no_such_plugin_module", "--report-to", "wandb")
    assert (
        R.counted_seeds({"sentences": {"prompt-tuning": plugged}})[1] is plugged
        and "no_such_plugin_module" not in sys.modules
    )
    # on the target's rows but without selection scores: listed, never counted
    unscored = _seeds(0.99, [None] * 3, method="p-tuning-v2")
    assert R.counted_seeds({"sentences": {"p-tuning-v2": unscored, "prompt-tuning": counted}})[1:] == (
        counted,
        {"rule": RULE, "candidates": {"prompt-tuning": 0.88}, "not_scored": ["p-tuning-v2"]},
    )
    # none as the target asks: nothing counts, and the target is unmet saying why
    assert R.targets({"sst2_seeds": {"sentences": {**outside, "p-tuning-v2": unscored}}})[SST2_TARGET] == {
        "method": None,
        "train_rows": "sentences",
        "met": False,
        "chosen": {"rule": RULE, "other_splits": list(outside), "not_scored": ["p-tuning-v2"]},
    }


def test_the_whole_sentences_variant_counts_when_recorded_never_the_better_one():
    phrases = _seeds(0.885, [0.9] * 3, train=PHRASES)
    sentences = _seeds(0.86, [0.9] * 3)
    assert R.targets({"sst2_seeds": {"phrases": {"prompt-tuning": phrases}}})[SST2_TARGET]["accuracy"] == 0.885
    target = R.targets(
        {"sst2_seeds": {"phrases": {"prompt-tuning": phrases}, "sentences": {"prompt-tuning": sentences}}}
    )[SST2_TARGET]
    assert (target["train_rows"], target["accuracy"], target["met"]) == ("sentences", 0.86, False)
    # a record of the sentences run over the phrases file is off the target's rows
    assert R.counted_seeds({"sentences": {"prompt-tuning": dict(sentences, runs=phrases["runs"])}})[1] is None
    minilm = R.targets({"minilm": {"phrases": _minilm(1.5), "sentences": dict(_minilm(3.0), train_rows="sentences")}})
    assert minilm[MINILM_TARGET] == {
        "gap_points": 3.0,
        "train_rows": "sentences",
        "met": False,
        "best_measured": {"gap_points": 1.5, "train_rows": "phrases"},
    }


# ------------------------------------------------------------------------------ older record layouts


def test_records_from_before_the_variants_read_as_the_phrases_one():
    flat = _seeds(0.881, [0.9] * 3, train=PHRASES)  # the oldest sst2_seeds: one flat record
    assert R.seed_variants(flat) == {"phrases": {"prompt-tuning": flat}}
    assert R.seed_variants({"phrases": flat}) == {"phrases": {"prompt-tuning": flat}}  # one record per training rows
    target = R.targets({"sst2_seeds": flat, "minilm": _minilm(2.5)})
    assert (target[SST2_TARGET]["method"], target[SST2_TARGET]["train_rows"], target[SST2_TARGET]["met"]) == (
        "prompt-tuning",
        "phrases",
        True,
    )
    assert target[MINILM_TARGET] == {
        "gap_points": 2.5,
        "train_rows": "phrases",
        "met": False,
        "best_measured": {"gap_points": 2.5, "train_rows": "phrases"},
    }


def test_an_old_rows_selection_score_is_read_off_its_curve_only_when_it_kept_the_best_state():
    def old(*extra, seed=1, **command):  # a row from before selection scores were recorded
        return {
            "seed": seed,
            "command": _command(seed, *extra, **command),
            "curve": {"100": 0.5, "200": 0.91},
            "final": {"kept_step": 200},
        }

    assert R.kept_selection_accuracy(old()) == 0.91
    # rows from before 038d58a record the best step as kept, even under --select-best last
    assert R.kept_selection_accuracy(old("--select-best", "last")) is None
    # without a selection split the curve scored evaluation rows, which never choose
    assert R.kept_selection_accuracy(old(selecting="")) is None
    assert R.kept_selection_accuracy(dict(old(), command="python other.py")) is None
    assert R.kept_selection_accuracy(dict(old(selecting=""), selection_accuracy=0.8)) == 0.8  # recorded: read as it is
    # a record's mean over its seeds, unless one run has no score
    runs = [old(seed=seed) for seed in (1, 2, 3)]
    assert R.counted_seeds({"sentences": {"prompt-tuning": dict(_seeds(0.87, [None] * 3), runs=runs)}})[2][
        "candidates"
    ] == {"prompt-tuning": pytest.approx(0.91)}
    assert R.seeds_selection_accuracy([old(), old(selecting="")]) is None and R.seeds_selection_accuracy([]) is None


def test_a_runs_curve_and_kept_step_from_its_metrics():
    # pstar train's history: selection evaluations at 50 and 100 (the last step), then the final one on dev
    metrics = {
        "metric": "accuracy",
        "history": {"eval_step": [50, 100, 100], "accuracy": [0.61, 0.55, 0.58]},
        "selection": {"best_step": 50},
    }
    assert R.curves(metrics) == {"curve": {50: 0.61, 100: 0.55}, "final": {"accuracy": 0.58, "kept_step": 50}}
    metrics["selection"] = {
        "select": "last",
        "best_step": 50,
        "last_step": 100,
    }  # --select-best last keeps the last state
    assert R.curves(metrics)["final"] == {"accuracy": 0.58, "kept_step": 100}
    bleu = {
        "metric": "bleu",
        "history": {"eval_step": [100, 200], "bleu": [40.0, 50.0]},
    }  # no selection split: the last step
    assert R.curves(bleu) == {"curve": {100: 40.0}, "final": {"bleu": 50.0, "kept_step": 200}}
    assert R.curves({"history": {}}) == {"curve": {}}


def test_the_reader_reads_a_commands_rows_as_pstar_train_does(tmp_path):
    from pstar_plugins.train.cli import parse_args
    from pstar_plugins.train.data import DATA_PLAN_FLAGS

    assert R.DATA_PLAN_FLAGS == DATA_PLAN_FLAGS  # the flags a checkpoint's data plan holds
    args = quality.parse_args(["--sst2-rows", "sentences"])
    commands = [
        step.command
        for part in ("sst2-methods", "sst2-seeds", "minilm", "rte-methods", "rte-longer", "e2e")
        for step in quality.STEPS[part](args, tmp_path)
    ]
    commands += [
        commands[1] + " --validation-split-percentage 20 --max-train-samples=3000 --column text=sentence --seed 7",
        "python -m pstar_plugins.train --method prompt-tuning --output-dir runs/defaults",
    ]  # every default
    for command in commands:
        trained = parse_args(shlex.split(command)[shlex.split(command).index("pstar_plugins.train") + 1 :])
        expected = {name: getattr(trained, name) for name in R.DATA_PLAN_FLAGS + R.RUN_ROWS_FLAGS}
        expected.update(
            {name: Path(expected[name]).name for name in ("train_file", "validation_file") if expected[name]}
        )
        assert R.run_data_plan({"command": command}) == expected, command


# ------------------------------------------------------------------------------ the launcher


def test_the_launchers_seed_commands_at_the_targets_settings_are_the_targets_rows(tmp_path):
    def plans(rows):
        args = quality.parse_args(
            [
                "--only",
                "sst2-seeds",
                "--sst2-rows",
                rows,
                "--seed-list",
                *map(str, R.TARGET_SEEDS),
                "--selection-percentage",
                str(R.TARGET_PERCENTAGE),
            ]
        )
        return sorted(
            (R.run_data_plan({"command": s.command}) for s in quality.sst2_seed_steps(args, tmp_path)),
            key=lambda p: p["seed"],
        )

    assert plans("sentences") == R.target_splits("sentences")
    # GLUE's train file when this checkout has it; the packaged sample it falls back to never counts
    assert (plans("phrases") == R.target_splits("phrases")) == (quality.C.SHARED_DATA / "sst2" / "train.tsv").is_file()


def test_every_dry_run_command_is_accepted_by_pstar_train_or_pstar_eval(tmp_path, capsys):
    from pstar_plugins.evaluate import parse_args as eval_args
    from pstar_plugins.train.cli import parse_args as train_args

    record, doc = R.RECORD.read_bytes(), R.QUALITY_DOC.read_bytes()
    work = tmp_path / "work"
    assert quality.main(["--dry-run", "--work-dir", str(work)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line[2:] for line in lines if line.startswith("# ")] == list(quality.PARTS)
    commands = [shlex.split(line) for line in lines if not line.startswith("# ")]
    evals = [argv[argv.index("pstar_plugins.evaluate") + 1 :] for argv in commands if "pstar_plugins.evaluate" in argv]
    trains = [argv[argv.index("pstar_plugins.train") + 1 :] for argv in commands if "pstar_plugins.train" in argv]
    assert len(evals) + len(trains) == len(commands) > 0
    for argv in evals:
        eval_args(argv)
    plugged = [
        argv for argv in trains if argv[:2] == ["-p", "bench.whole_model"]
    ]  # it would stay registered after this test
    assert len(plugged) == 1
    for argv in trains:
        if argv not in plugged:
            train_args(argv)
    assert not work.exists()
    assert (R.RECORD.read_bytes(), R.QUALITY_DOC.read_bytes()) == (record, doc)


def test_p_tuning_template_puts_soft_tokens_around_the_input_and_keeps_the_words():
    assert (
        quality.p_tuning_template("Review: {sentence} Sentiment:{answer}")
        == "{soft:3} Review: {sentence} {soft:3} Sentiment:{answer}"
    )
    assert (
        quality.p_tuning_template("{{note}} {sentence1}\nQuestion: {sentence2} True or False?\nAnswer:{answer}")
        == "{soft:3} {{note}} {sentence1}\nQuestion: {sentence2} {soft:3} True or False?\nAnswer:{answer}"
    )
    placed = "{soft:2} {sentence} X:{answer}"
    assert quality.p_tuning_template(placed) == placed


def test_treebank_sentences_are_the_rows_no_other_row_contains():
    rows = [
        ("a fine film . ", "1"),
        ("a fine film", "1"),
        ("fine", "1"),
        ("film . ", "0"),
        ("dull", "0"),
        ("a dull , dull day", "0"),
        ("dull day", "0"),
        ("finely", "1"),
    ]
    # "dull" is inside "a dull , dull day"; "finely" is not a run of words of "a fine film ."
    assert quality.treebank_sentences(rows) == [("a fine film . ", "1"), ("a dull , dull day", "0"), ("finely", "1")]


def _fake_training(accuracy, **metrics):
    def run_step(step, log):  # what pstar train writes, without training
        step.output.mkdir(parents=True)
        (step.output / "metrics.json").write_text(
            json.dumps({"tuned_accuracy": accuracy, "trainable_parameters": 5, "history": {}, **metrics})
        )
        return 1.0

    return run_step


def test_a_rerun_part_replaces_only_its_own_rows(tmp_path, monkeypatch):
    monkeypatch.setattr(quality, "run_step", _fake_training(0.6, max_steps=564, steps=300))
    args = quality.parse_args(["--selection-percentage", "0", "--rte-epochs", "4"])
    args.previous = {"rte_longer": {"p-tuning-v2, 2 epochs": {"accuracy": 0.5, "epochs": 2.0}}}
    rows = quality.run_rte_longer(args, tmp_path)
    assert rows["p-tuning-v2, 2 epochs"] == {"accuracy": 0.5, "epochs": 2.0}  # another length keeps its row
    # an early stop ended at step 300; the row states the planned 564 steps and its epochs
    assert {k: rows["p-tuning-v2, 4 epochs"][k] for k in ("accuracy", "steps", "epochs")} == {
        "accuracy": 0.6,
        "steps": 564,
        "epochs": 4.0,
    }


def test_a_minilm_rerun_on_sentences_keeps_an_old_phrases_record_with_its_date(tmp_path, monkeypatch):
    def sentences(work):  # two sentences, as write_sst2_sentences writes them
        (work / R.SENTENCES_FILE).write_text("sentence\tlabel\na fine film .\t1\na dull day .\t0\n")

    trained_on = []

    def full_fine_tuning(train_rows, *rest, **kw):
        trained_on.append([r["sentence"] for r in train_rows])
        return {"accuracy": 0.875, "trainable_parameters": 9, "learning_rate": 5e-5}

    monkeypatch.setattr(quality, "write_sst2_sentences", sentences)
    monkeypatch.setattr(quality, "run_step", _fake_training(0.86))
    monkeypatch.setattr(quality.minilm_reference, "full_finetune_minilm", full_fine_tuning)
    args = quality.parse_args(["--sst2-rows", "sentences"])
    old = {"steps": 1800, "batch_size": 16, "gap_points": 2.5}  # from before the variants: the part's date was its own
    args.previous = {"minilm": dict(old), "part_dates": {"minilm": "2026-11-29T10:00:00+00:00"}}
    rows = quality.run_minilm(args, tmp_path)
    assert trained_on == [["a fine film .", "a dull day ."]]  # full fine-tuning reads the file P-tuning v2 trained on
    assert rows["phrases"] == dict(old, date="2026-11-29T10:00:00+00:00")
    assert (rows["sentences"]["training_examples"], rows["sentences"]["gap_points"]) == (2, pytest.approx(1.5))
    assert R.targets({"minilm": rows})[MINILM_TARGET]["train_rows"] == "sentences"


# ------------------------------------------------------------------------------ the committed record and document


def test_the_recorded_targets_are_the_ones_the_recorded_rows_give():
    record = json.loads(R.RECORD.read_text())
    assert record["targets"] == R.targets(record)


def test_docs_quality_md_holds_the_table_of_the_committed_record():
    assert R.marked_text(R.QUALITY_DOC.read_text(), R.TABLE_MARKER) == R.quality_table(json.loads(R.RECORD.read_text()))


def test_the_table_is_written_between_the_markers_and_nowhere_else(tmp_path):
    doc = tmp_path / "quality.md"
    doc.write_text(R.QUALITY_DOC.read_text())
    assert R.write_between_markers(doc, R.TABLE_MARKER, "| new | table |")
    before, after = (
        text.split(f"<!-- {R.TABLE_MARKER}:start -->") for text in (R.QUALITY_DOC.read_text(), doc.read_text())
    )
    assert (
        after[0] == before[0]
        and after[1].split(f"<!-- {R.TABLE_MARKER}:end -->")[1] == before[1].split(f"<!-- {R.TABLE_MARKER}:end -->")[1]
    )
    assert R.marked_text(doc.read_text(), R.TABLE_MARKER) == "| new | table |"
    unmarked = tmp_path / "other.md"
    unmarked.write_text("no block\n")
    assert not R.write_between_markers(unmarked, R.TABLE_MARKER, "x") and unmarked.read_text() == "no block\n"

"""bench/quality.py's pure parts: the commands it runs (accepted by ``pstar train`` and ``pstar
eval`` as they are printed), P-tuning's template built from a task's template, the noise figure,
the targets and the README table; ``--dry-run`` prints and writes nothing."""

import json
import shlex
import statistics
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import quality  # noqa: E402

from pstar_plugins import evaluate, train  # noqa: E402
from pstar_plugins.tasks.template import Literal, Template  # noqa: E402


def test_p_tuning_template_of_the_sst2_template_is_the_recorded_sst2_rows_template():
    # the template of the SST-2 p-tuning row recorded before presets stopped naming SST-2 columns
    recorded = "{soft:3} Review: {sentence} {soft:3} Sentiment:{answer}"
    assert quality.p_tuning_template("Review: {sentence} Sentiment:{answer}") == recorded


def test_p_tuning_template_keeps_a_pair_tasks_columns_words_and_braces():
    text = quality.p_tuning_template("{{note}} {sentence1}\nQuestion: {sentence2} True or False?\nAnswer:{answer}")
    assert text == "{soft:3} {{note}} {sentence1}\nQuestion: {sentence2} {soft:3} True or False?\nAnswer:{answer}"
    parsed = Template.parse(text)
    assert parsed.fields == ["sentence1", "sentence2"] and parsed.num_soft_tokens == 6
    assert "".join(p.text for p in parsed.parts if isinstance(p, Literal)).startswith(" {note} ")
    placed = "{soft:2} {sentence} X:{answer}"
    assert quality.p_tuning_template(placed) == placed


def test_binomial_standard_error_of_one_sst2_run_is_about_one_point():
    assert quality.binomial_standard_error(0.87, 872) == pytest.approx(0.011389, abs=1e-6)
    assert quality.binomial_standard_error(0.5, 277) == pytest.approx(0.030042, abs=1e-6)
    with pytest.raises(ValueError, match="accuracy 87"):
        quality.binomial_standard_error(87, 872)


def _args(*argv):
    args = quality.parse_args(list(argv))
    args.previous = {}
    return args


def _tail(argv, module):
    return argv[argv.index(module) + 1:]


def test_rte_method_commands_parse_as_pstar_train_flags(tmp_path):
    steps = quality.rte_method_steps(_args("--selection-percentage", "0", "--rte-steps", "90"), tmp_path)
    assert [s.output.name for s in steps] == [f"rte-{m}" for m in quality.METHODS]
    for step in steps:
        assert step.argv[:2] == ["accelerate", "launch"] and shlex.split(step.command) == step.argv
        args = train.parse_args(_tail(step.argv, "-m")[1:])
        assert (args.max_steps, args.warmup_steps, args.eval_steps, args.max_length) == (90, 9, 30, quality.RTE_MAX_LENGTH)
        assert args.label_words == quality.RTE_LABEL_WORDS and args.validation_split_percentage is None
        expected = quality.p_tuning_template(quality.RTE_TEMPLATE) if args.method == "p-tuning" else quality.RTE_TEMPLATE
        assert args.template == expected  # "\n" typed as \n on the command line, read back as a newline


@pytest.mark.skipif("--select-best" not in train.build_parser([]).option_strings(),
                    reason="pstar train of this checkout has no --select-best")
def test_selection_flags_parse_as_pstar_train_flags(tmp_path):
    for step in quality.rte_method_steps(_args(), tmp_path) + quality.sst2_seed_steps(_args(), tmp_path):
        args = train.parse_args(_tail(step.argv, "-m")[1:])
        assert args.validation_split_percentage == 10 and args.select_best == "best"


def test_sst2_seed_commands_differ_only_in_seed_and_folder(tmp_path):
    steps = quality.sst2_seed_steps(_args("--seed-list", "4", "5", "--selection-percentage", "0"), tmp_path)
    a, b = (train.parse_args(_tail(s.argv, "-m")[1:]) for s in steps)
    assert (a.seed, b.seed) == (4, 5) and a.output_dir != b.output_dir
    assert {k: v for k, v in vars(a).items() if k not in ("seed", "output_dir")} == \
           {k: v for k, v in vars(b).items() if k not in ("seed", "output_dir")}
    with_selection = quality.sst2_seed_steps(_args(), tmp_path)[0].argv
    assert with_selection[with_selection.index("--validation-split-percentage"):][:4] == \
           ["--validation-split-percentage", "10", "--select-best", "best"]


def test_prompting_commands_parse_as_pstar_eval_flags(tmp_path):
    args = _args()
    rte_plain, rte_calibrated = quality.rte_prompting_steps(args, tmp_path)
    (e2e,) = quality.e2e_prompting_steps(args, tmp_path)
    plain = evaluate.parse_args(_tail(rte_plain.argv, "pstar_plugins.evaluate"))
    calibrated = evaluate.parse_args(_tail(rte_calibrated.argv, "pstar_plugins.evaluate"))
    assert (plain.shots, calibrated.shots, plain.seeds) == ([0, 4], [0], 3)
    assert (plain.calibrate, calibrated.calibrate) == (False, True)
    assert plain.label_words == quality.RTE_LABEL_WORDS and plain.validation_file.endswith("rte/dev.jsonl")
    gen = evaluate.parse_args(_tail(e2e.argv, "pstar_plugins.evaluate"))
    e2e_train = quality.e2e_method_steps(args, tmp_path)[0].argv
    # the prompting rows decode the same dev rows, to the same length, as the trained rows' final evaluation
    assert (gen.task, gen.shots, gen.max_eval_samples, gen.max_new_tokens) == ("generation", [0, 2], 400, 48)
    assert e2e_train[e2e_train.index("--max-eval-samples") + 1] == "400"
    assert e2e_train[e2e_train.index("--max-new-tokens") + 1] == "48"


def test_dry_run_prints_every_command_and_writes_nothing(tmp_path, capsys):
    results = quality.C.RESULTS / "quality.json"
    before = results.read_bytes() if results.is_file() else None
    readme = (quality.C.ROOT / "README.md").read_bytes()
    work = tmp_path / "work"
    assert quality.main(["--dry-run", "--only", "rte-prompting", "rte-methods", "--work-dir", str(work)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "# rte-prompting" and lines[3] == "# rte-methods" and len(lines) == 8
    assert all("pstar_plugins.evaluate" in line for line in lines[1:3])
    assert all("pstar_plugins.train" in line for line in lines[4:])
    assert not work.exists() and readme == (quality.C.ROOT / "README.md").read_bytes()
    assert (results.read_bytes() if results.is_file() else None) == before


def _run(name, shots, accuracy, calibrated=False, std=0.0, seeds=None):
    return {"name": f"{shots}-shot" + (" calibrated" if calibrated else ""), "shots": shots, "seeds": seeds or (3 if shots else 1),
            "accuracy": accuracy, "accuracy_std": std}


def _seed_runs(selection, *argv, rows="phrases", dev=0.88, method="prompt-tuning", **fields):
    """Runs as ``run_sst2_seeds`` records them: the commands of ``--only sst2-seeds`` (defaults,
    then ``argv``), one per seed, with ``selection`` as their kept states' selection scores
    (``None``: a row from before they were recorded)."""
    args = _args("--only", "sst2-seeds", "--sst2-rows", rows, "--seeds-method", method, *argv)
    steps = quality.sst2_seed_steps(args, Path("runs/bench-quality"))
    return [{"accuracy": dev, "seed": seed, "command": step.command, **fields,
             **({"selection_accuracy": value} if value is not None else {})}
            for seed, step, value in zip(args.seed_list, steps, selection)]


def _record(rte_best=0.62, prefix_bleu=50.0, seeds_mean=0.881):
    return {
        "date": "2026-12-01T10:00:00+00:00", "machine": {"cpus": 2}, "steps": 300, "batch_size": 16, "e2e_steps": 200,
        "part_dates": {"icl": "2026-11-28T00:00:00+00:00", "sst2_methods": "2026-11-28T00:00:00+00:00",
                       "sst2_seeds": "2026-12-02T00:00:00+00:00", "rte_prompting": "2026-12-01T14:00:00+00:00",
                       "rte_methods": "2026-12-03T00:00:00+00:00", "e2e": "2026-11-28T00:00:00+00:00",
                       "e2e_prompting": "2026-12-01T15:00:00+00:00"},
        "icl": {"runs": [_run("0-shot", 0, 0.783)]},
        # an old-format row: its command is the list of train flags
        "sst2_methods": {"prompt-tuning": {"accuracy": 0.874, "command": ["--method", "prompt-tuning"]}},
        "sst2_seeds": {"method": "prompt-tuning", "steps": 300, "batch_size": 16, "options": [], "selection_percentage": 10,
                       "seeds": [1, 2, 3], "accuracy": seeds_mean, "accuracy_std": 0.004, "runs": _seed_runs([0.9] * 3)},
        "rte_prompting": {"template": quality.RTE_TEMPLATE, "label_words": ["True", "False"],
                          "runs": [_run("0-shot", 0, 0.52), _run("4-shot", 4, 0.55, std=0.02), _run("0-shot", 0, 0.57, calibrated=True)]},
        "rte_methods": {"prompt-tuning": {"accuracy": rte_best, "steps": 90, "batch_size": 16, "selection_percentage": 10},
                        "p-tuning-v2": {"accuracy": 0.5, "steps": 90, "batch_size": 16, "selection_percentage": 10}},
        "e2e": {"prefix-tuning": {"bleu": prefix_bleu, "rouge_l": 60.0, "sources": 46},
                "prompt-tuning": {"bleu": 40.0, "rouge_l": 55.0, "sources": 46}},
        "e2e_prompting": {"sources": 46, "runs": [{"name": "0-shot", "shots": 0, "seeds": 1, "bleu": 10.0, "rouge_l": 30.0},
                                                  {"name": "2-shot", "shots": 2, "seeds": 3, "bleu": 50.0, "bleu_std": 1.5,
                                                   "rouge_l": 58.0, "rouge_l_std": 0.5}]},
        "minilm": {"training_examples": 9600, "steps": 1800, "batch_size": 16, "epochs": 3.0, "gap_points": 2.5,
                   "p-tuning-v2": {"accuracy": 0.844, "trainable_parameters": 74498},
                   "full-finetuning": {"accuracy": 0.869, "trainable_parameters": 22566146}},
    }


def test_targets_compare_against_the_best_baseline_rows():
    t = quality.targets(_record())
    rte = t["rte_best_method_at_least_zero_shot_plus_5_and_best_icl"]
    # the best zero-shot row is the calibrated one (57.0): 62.0 is exactly 5 points above it
    assert rte["best_zero_shot"] == {"name": "0-shot calibrated", "accuracy": 0.57} and rte["best_icl"]["accuracy"] == 0.55
    assert rte["method"] == "prompt-tuning" and rte["met"] is True
    assert quality.targets(_record(rte_best=0.619))["rte_best_method_at_least_zero_shot_plus_5_and_best_icl"]["met"] is False
    assert t["e2e_prefix_tuning_bleu_at_least_k_shot"] == {"prefix_tuning_bleu": 50.0, "prompting": "2-shot",
                                                           "prompting_bleu": 50.0, "met": True}
    assert quality.targets(_record(prefix_bleu=49.9))["e2e_prefix_tuning_bleu_at_least_k_shot"]["met"] is False
    assert t["sst2_mean_of_seeds_at_least_0.88"]["met"] is True
    assert quality.targets(_record(seeds_mean=0.8799))["sst2_mean_of_seeds_at_least_0.88"]["met"] is False
    assert t["minilm_within_2_points"] == {"gap_points": 2.5, "train_rows": "phrases", "met": False,
                                           "best_measured": {"gap_points": 2.5, "train_rows": "phrases"}}


def test_targets_wait_for_the_parts_they_need():
    record = _record()
    del record["rte_methods"], record["e2e_prompting"], record["sst2_seeds"], record["minilm"]
    assert set(quality.targets(record).values()) == {None}


def test_readme_table_dates_every_row_and_states_the_noise():
    table = quality.readme_table(_record())
    assert "| zero-shot prompt | 78.3 | 2026-11-28 |" in table
    assert "| prompt-tuning (300 steps × 16, kept state chosen on 10% of train), seeds 1, 2, 3 | 88.1 ± 0.4 | 2026-12-02 |" in table
    assert "| zero-shot prompt, contextual calibration | 57.0 | 2026-12-01 |" in table
    assert "| 4-shot in-context (3 draws) | 55.0 ± 2.0 | 2026-12-01 |" in table
    assert "| prompt-tuning (90 steps × 16; kept state chosen on 10% of train) | 62.0 | 2026-12-03 |" in table
    assert "| 2-shot in-context (3 draws) | 50.0 ± 1.5 | 58.0 ± 0.5 | 2026-12-01 |" in table
    assert "| prefix-tuning (200 steps × 8) | 50.0 | 60.0 | 2026-11-28 |" in table
    assert "template `{sentence1}\\nQuestion: {sentence2} True or False?\\nAnswer:{answer}`" in table
    # the best SST-2 row (88.1%) on 872 sentences: √(0.881·0.119/872) = 1.1 points; RTE's best (62%) on 277: 2.9
    assert "√(p(1−p)/872) = 1.1 points at p = 88%, and the difference of two runs one of 1.6 points" in table
    assert "√(p(1−p)/277) = 2.9 points at p = 62%" in table
    for line in table.splitlines():
        if line.startswith("| ") and not line.startswith("|---") and "measured" not in line:
            assert line.rstrip(" |").rsplit("| ", 1)[1].startswith("2026-"), line


def test_an_sst2_method_row_keeps_its_own_date_when_another_is_rerun():
    record = _record()
    record["sst2_methods"] = {"prompt-tuning": {"accuracy": 0.874, "date": "2026-11-28T04:49:07+00:00"},
                              "p-tuning-v2": {"accuracy": 0.870, "date": "2026-12-01T16:04:43+00:00"}}
    record.setdefault("part_dates", {})["sst2_methods"] = "2026-12-01T16:04:43+00:00"
    table = quality.readme_table(record)
    assert "| prompt-tuning (300 steps × 16) | 87.4 | 2026-11-28 |" in table
    assert "| p-tuning-v2 (300 steps × 16) | 87.0 | 2026-12-01 |" in table


def test_treebank_sentences_are_the_rows_no_other_row_contains():
    rows = [("a fine film . ", "1"), ("a fine film", "1"), ("fine", "1"), ("film . ", "0"), ("dull", "0"),
            ("a dull , dull day", "0"), ("dull day", "0"), ("finely", "1")]
    # "dull" is inside "a dull , dull day"; "finely" is not a run of words of "a fine film ."
    assert quality.treebank_sentences(rows) == [("a fine film . ", "1"), ("a dull , dull day", "0"), ("finely", "1")]


def test_sst2_sentence_rows_train_on_the_written_file(tmp_path):
    steps = quality.sst2_seed_steps(_args("--sst2-rows", "sentences"), tmp_path)
    for step in steps:
        args = train.parse_args(_tail(step.argv, "-m")[1:])
        assert args.train_file == quality.rel(tmp_path / "sst2-train-sentences.tsv")
        assert step.output.name.startswith("sst2-seeds-sentences-")
    phrases = train.parse_args(_tail(quality.sst2_seed_steps(_args(), tmp_path)[0].argv, "-m")[1:])
    assert phrases.train_file == quality.rel(quality.sst2_files()[0])


def test_rte_longer_commands_train_for_epochs_and_keep_the_selected_state(tmp_path):
    (step,) = quality.rte_longer_steps(_args("--rte-epochs", "3"), tmp_path)
    args = train.parse_args(_tail(step.argv, "-m")[1:])
    assert (args.method, args.num_train_epochs, args.warmup_ratio, args.eval_steps) == ("p-tuning-v2", 3.0, 0.1, 70)
    assert args.max_steps is None or "--max-steps" not in step.argv
    assert step.output.name == "rte-p-tuning-v2-3-epochs" and args.template == quality.RTE_TEMPLATE
    (rte_row,) = [s for s in quality.rte_method_steps(_args(), tmp_path) if s.output.name == "rte-p-tuning-v2"]
    # the same run as the one-epoch row but for its length and evaluation interval
    short = train.parse_args(_tail(rte_row.argv, "-m")[1:])
    same = ("model", "train_file", "validation_file", "template", "label_words", "max_length", "batch_size", "select_best",
            "validation_split_percentage", "seed")
    assert {k: getattr(args, k) for k in same} == {k: getattr(short, k) for k in same}


def test_a_longer_rte_run_counts_for_the_target_and_has_its_own_row():
    record = _record(rte_best=0.60)
    record["rte_longer"] = {"p-tuning-v2, 4 epochs": {"accuracy": 0.621, "epochs": 4.0, "steps": 564, "batch_size": 16,
                                            "selection_percentage": 10, "date": "2026-12-04T00:00:00+00:00"},
                            "p-tuning-v2, 2 epochs": {"accuracy": 0.59, "epochs": 2.0, "steps": 282, "batch_size": 16,
                                                      "date": "2026-12-04T00:00:00+00:00"}}
    rte = quality.targets(record)["rte_best_method_at_least_zero_shot_plus_5_and_best_icl"]
    assert (rte["method"], rte["accuracy"], rte["met"]) == ("p-tuning-v2, 4 epochs", 0.621, True)
    table = quality.readme_table(record)
    assert "| p-tuning-v2 (564 steps × 16, 4 epochs; kept state chosen on 10% of train) | 62.1 | 2026-12-04 |" in table
    assert "| p-tuning-v2 (90 steps × 16; kept state chosen on 10% of train) | 50.0 | 2026-12-03 |" in table
    assert "| p-tuning-v2 (282 steps × 16, 2 epochs) | 59.0 | 2026-12-04 |" in table


def test_sst2_seed_rows_by_training_rows_keep_the_phrases_record_and_the_sentences_count():
    record = _record(seeds_mean=0.867)
    old = record["sst2_seeds"]
    assert quality.seed_variants(old) == {"phrases": {"prompt-tuning": old}}
    record["sst2_seeds"] = {"phrases": old, "sentences": dict(old, accuracy=0.883, train_rows="sentences", date="2026-12-05T00:00:00+00:00",
                                                               runs=_seed_runs([0.9] * 3, rows="sentences", metrics={"train_rows": 6197}))}
    target = quality.targets(record)["sst2_mean_of_seeds_at_least_0.88"]
    assert (target["train_rows"], target["accuracy"], target["met"]) == ("sentences", 0.883, True)
    lower = dict(record, sst2_seeds=dict(record["sst2_seeds"], sentences=dict(record["sst2_seeds"]["sentences"], accuracy=0.86)))
    assert quality.targets(lower)["sst2_mean_of_seeds_at_least_0.88"]["accuracy"] == 0.86  # counted, not the better phrases
    table = quality.readme_table(record)
    assert "| prompt-tuning (300 steps × 16, kept state chosen on 10% of train), seeds 1, 2, 3 | 86.7 ± 0.4 | 2026-12-02 |" in table
    assert ("| prompt-tuning (300 steps × 16, kept state chosen on 10% of train; trained on whole sentences only (6,197 rows)), "
            "seeds 1, 2, 3 | 88.3 ± 0.4 | 2026-12-05 |") in table


def test_an_rte_part_replaces_only_the_rows_it_reruns(tmp_path, monkeypatch):
    def fake_run(step, log):  # what pstar train writes, without training
        step.output.mkdir(parents=True)
        (step.output / "metrics.json").write_text(
            '{"tuned_accuracy": 0.6, "trainable_parameters": 5, "max_steps": 564, "steps": 300, "history": {}}')
        return 1.0

    monkeypatch.setattr(quality, "run_step", fake_run)
    args = _args("--selection-percentage", "0", "--rte-epochs", "4")
    args.previous = {"rte_longer": {"p-tuning-v2, 2 epochs": {"accuracy": 0.5, "epochs": 2.0}},
                     "rte_methods": {"p-tuning-v2": {"accuracy": 0.58}}}
    rows = quality.run_rte_longer(args, tmp_path)
    assert rows["p-tuning-v2, 2 epochs"] == {"accuracy": 0.5, "epochs": 2.0}  # another length keeps its row
    # an early stop ends at step 300; the row states the planned 564 and its epochs
    new = rows["p-tuning-v2, 4 epochs"]
    assert (new["accuracy"], new["steps"], new["epochs"]) == (0.6, 564, 4.0)
    assert args.previous["rte_methods"] == {"p-tuning-v2": {"accuracy": 0.58}}


def test_sentence_rows_are_only_for_the_seeds_part(tmp_path):
    with pytest.raises(SystemExit, match="--sst2-rows sentences is for the sst2-seeds and minilm parts"):
        quality.main(["--only", "sst2-methods", "--sst2-rows", "sentences", "--work-dir", str(tmp_path)])


def test_a_selection_runs_curve_keeps_its_last_step_apart_from_the_final_evaluation():
    # pstar train's history: selection evaluations at 50 and 100 (the last step), then the final one on dev
    metrics = {"metric": "accuracy", "history": {"eval_step": [50, 100, 100], "accuracy": [0.55, 0.61, 0.58]},
               "selection": {"best_step": 100}}
    assert quality.curves(metrics) == {"curve": {50: 0.55, 100: 0.61}, "final": {"accuracy": 0.58, "kept_step": 100}}
    # the state kept at step 50 is the one the final evaluation scored
    metrics = {"metric": "accuracy", "history": {"eval_step": [50, 100, 100], "accuracy": [0.61, 0.55, 0.58]},
               "selection": {"best_step": 50}}
    assert quality.curves(metrics)["final"] == {"accuracy": 0.58, "kept_step": 50}
    # without a selection split the last step's state is scored; a generation run's metric is BLEU
    # --select-best last keeps the last step's state, whichever step was best
    metrics["selection"] = {"select": "last", "best_step": 50, "last_step": 100}
    assert quality.curves(metrics)["final"] == {"accuracy": 0.58, "kept_step": 100}
    bleu = {"metric": "bleu", "history": {"eval_step": [100, 200], "bleu": [40.0, 50.0]}}
    assert quality.curves(bleu) == {"curve": {100: 40.0}, "final": {"bleu": 50.0, "kept_step": 200}}
    assert quality.curves({"history": {}}) == {"curve": {}}


def test_minilm_rows_by_training_rows_keep_the_phrases_record_and_the_sentences_count(tmp_path, monkeypatch):
    def fake_sentences(work):  # two sentences, as write_sst2_sentences writes them
        out = work / "sst2-train-sentences.tsv"
        out.write_text("sentence\tlabel\na fine film .\t1\na dull day .\t0\n")
        return out

    def fake_run(step, log):  # what pstar train writes, without training
        assert step.output.name == "minilm-p-tuning-v2-sentences"
        assert train.parse_args(_tail(step.argv, "-m")[1:]).train_file == quality.rel(tmp_path / "sst2-train-sentences.tsv")
        step.output.mkdir(parents=True)
        (step.output / "metrics.json").write_text('{"tuned_accuracy": 0.86, "trainable_parameters": 5}')
        return 1.0

    trained_on = []

    def fake_full(train_rows, *rest, **kw):
        trained_on.append([r["sentence"] for r in train_rows])
        return {"accuracy": 0.875, "trainable_parameters": 9, "learning_rate": 5e-5}

    monkeypatch.setattr(quality, "write_sst2_sentences", fake_sentences)
    monkeypatch.setattr(quality, "run_step", fake_run)
    monkeypatch.setattr(quality, "full_finetune_minilm", fake_full)
    args = _args("--sst2-rows", "sentences")
    old = _record()["minilm"]
    args.previous = {"minilm": dict(old), "part_dates": {"minilm": "2026-11-29T10:00:00+00:00"}}
    rows = quality.run_minilm(args, tmp_path)
    assert trained_on == [["a fine film .", "a dull day ."]]  # full fine-tuning reads the same file as P-tuning v2
    assert rows["phrases"] == dict(old, date="2026-11-29T10:00:00+00:00")  # the old rows keep their own date
    new = rows["sentences"]
    assert (new["training_examples"], new["epochs"], new["train_rows"]) == (2, 1800 * 16 / 2, "sentences")
    assert new["gap_points"] == pytest.approx(1.5)
    record = dict(_record(), minilm=rows)
    assert quality.targets(record)["minilm_within_2_points"] == {
        "gap_points": pytest.approx(1.5), "train_rows": "sentences", "met": True,
        "best_measured": {"gap_points": pytest.approx(1.5), "train_rows": "sentences"}}
    # the sentences are counted whatever their gap: a larger one than the phrases' is not passed over
    wider = dict(record, minilm=dict(rows, sentences=dict(new, gap_points=3.0)))
    assert quality.targets(wider)["minilm_within_2_points"] == {"gap_points": 3.0, "train_rows": "sentences", "met": False,
                                                                "best_measured": {"gap_points": 2.5, "train_rows": "phrases"}}
    record["part_dates"]["minilm"] = "2026-12-05T00:00:00+00:00"  # as main() dates the part it reran
    table = quality.readme_table(record)
    assert "| SST-2 dev, all-MiniLM-L6-v2, SST-2 train as it is: 9,600 labelled examples, 1800 steps × 16 (3.0 epochs) each" in table
    assert "| P-tuning v2 + linear head (frozen encoder) | 84.4 | 74,498 | 2026-11-29 |" in table
    assert "| SST-2 dev, all-MiniLM-L6-v2, whole sentences of SST-2 train: 2 labelled examples, 1800 steps × 16 (14400.0 epochs) each" in table
    assert "| P-tuning v2 + linear head (frozen encoder) | 86.0 | 5 |" in table


def test_the_rte_reference_is_full_fine_tuning_at_the_methods_budget_and_no_method_of_the_target(tmp_path, monkeypatch):
    from pstar_plugins import plugins

    monkeypatch.setattr(plugins, "_MANAGER", None)  # -p bench.whole_model registers in a manager of this test's own
    (step,) = quality.rte_reference_steps(_args(), tmp_path)
    argv = _tail(step.argv, "-m")[1:]
    assert argv[:2] == ["-p", "bench.whole_model"]
    args = train.parse_args(argv)
    method_run = train.parse_args(_tail(quality.rte_method_steps(_args(), tmp_path)[0].argv, "-m")[1:])
    assert args.method == "whole-model" and args.learning_rate == 2e-5
    for flag in ("max_steps", "warmup_steps", "batch_size", "template", "label_words", "train_file", "validation_split_percentage",
                 "select_best", "eval_steps", "seed"):
        assert getattr(args, flag) == getattr(method_run, flag), flag

    def fake_run(step, log):  # what pstar train writes, without training
        step.output.mkdir(parents=True)
        (step.output / "metrics.json").write_text('{"tuned_accuracy": 0.7, "trainable_parameters": 9, "max_steps": 150, "history": {}}')
        return 1.0

    monkeypatch.setattr(quality, "run_step", fake_run)
    record = _record(rte_best=0.58)
    record["rte_reference"] = quality.run_rte_reference(_args(), tmp_path)
    record["rte_reference"]["full fine-tuning"]["date"] = "2026-12-06T00:00:00+00:00"
    target = quality.targets(record)["rte_best_method_at_least_zero_shot_plus_5_and_best_icl"]
    assert (target["method"], target["accuracy"], target["met"]) == ("prompt-tuning", 0.58, False)
    assert ("| full fine-tuning, every weight: a reference, not a prompt method (150 steps × 16, learning rate 2e-05; kept state "
            "chosen on 10% of train) | 70.0 | 2026-12-06 |") in quality.readme_table(record)


def test_rte_seed_runs_are_the_methods_command_with_other_seeds_and_their_mean_counts(tmp_path, monkeypatch):
    steps = quality.rte_seed_steps(_args("--seed-list", "4", "5"), tmp_path)
    method_run = train.parse_args(_tail(next(s for s in quality.rte_method_steps(_args(), tmp_path)
                                             if s.output.name == "rte-p-tuning-v2").argv, "-m")[1:])
    runs = [train.parse_args(_tail(s.argv, "-m")[1:]) for s in steps]
    assert [r.seed for r in runs] == [4, 5] and len({r.output_dir for r in runs}) == 2
    for run in runs:  # everything else is the rte-methods row's command
        assert {k: v for k, v in vars(run).items() if k not in ("seed", "output_dir")} == \
               {k: v for k, v in vars(method_run).items() if k not in ("seed", "output_dir")}

    accuracies = iter([0.60, 0.64])

    def fake_run(step, log):  # what pstar train writes, without training
        step.output.mkdir(parents=True)
        (step.output / "metrics.json").write_text(json.dumps({"tuned_accuracy": next(accuracies), "trainable_parameters": 5,
                                                              "max_steps": 150, "history": {}}))
        return 1.0

    monkeypatch.setattr(quality, "run_step", fake_run)
    record = _record(rte_best=0.58)  # prompt-tuning 58.0 and p-tuning-v2 50.0 from one run each
    record["rte_seeds"] = quality.run_rte_seeds(_args("--seed-list", "4", "5"), tmp_path)
    record["rte_seeds"]["p-tuning-v2"]["date"] = "2026-12-07T00:00:00+00:00"
    target = quality.targets(record)["rte_best_method_at_least_zero_shot_plus_5_and_best_icl"]
    assert (target["method"], target["seeds"], target["met"]) == ("p-tuning-v2", [4, 5], True)  # 62.0 ≥ 57.0 + 5
    assert target["accuracy"] == pytest.approx(0.62) and target["accuracy_std"] == pytest.approx(0.02)
    table = quality.readme_table(record)
    assert "| p-tuning-v2 (150 steps × 16; kept state chosen on 10% of train), seeds 4, 5 | 62.0 ± 2.0 | 2026-12-07 |" in table
    assert "| p-tuning-v2 (90 steps × 16; kept state chosen on 10% of train) | 50.0 | 2026-12-03 |" in table  # still shown
    lower = dict(record, rte_seeds={"p-tuning-v2": dict(record["rte_seeds"]["p-tuning-v2"], accuracy=0.49)})
    # the mean counts for p-tuning-v2 even where its one run was better; the best method is then another
    assert quality.targets(lower)["rte_best_method_at_least_zero_shot_plus_5_and_best_icl"]["method"] == "prompt-tuning"


def _old_seed_runs(scores, kept_steps):
    """Rows from before selection scores were recorded: ``(dev, selection)`` per seed, the
    selection score on the curve at each run's kept step."""
    runs = _seed_runs([None] * len(scores), rows="sentences")
    for run, (dev, selection), kept in zip(runs, scores, kept_steps):
        run.update(accuracy=dev, curve={"100": 0.5, str(kept): selection}, final={"accuracy": dev, "kept_step": kept})
    return runs


def test_of_two_methods_over_seeds_the_target_counts_the_one_best_on_the_selection_splits(tmp_path, monkeypatch):
    scores = iter([(0.88, 0.90), (0.89, 0.91), (0.90, 0.92)])  # (dev, selection) of p-tuning-v2's three seeds

    def fake_run(step, log):  # what pstar train writes with --select-best best, without training
        dev, selection = next(scores)
        step.output.mkdir(parents=True)
        (step.output / "metrics.json").write_text(json.dumps({
            "tuned_accuracy": dev, "trainable_parameters": 5, "metric": "accuracy",
            "history": {"eval_step": [150, 300, 300], "accuracy": [selection, 0.5, dev]},
            "selection": {"select": "best", "best_step": 150, "best_accuracy": selection, "last_accuracy": 0.5}}))
        return 1.0

    monkeypatch.setattr(quality, "run_step", fake_run)
    monkeypatch.setattr(quality, "write_sst2_sentences", lambda work: None)
    monkeypatch.setattr(quality, "check_train_supports", lambda flag: None)
    record = _record()
    # prompt tuning's row from before selection accuracies were recorded: read off its curves at the kept steps
    prompt = dict(record["sst2_seeds"], train_rows="sentences", accuracy=0.87,
                  runs=_old_seed_runs([(0.86, 0.88), (0.88, 0.90), (0.87, 0.89)], [300, 200, 300]))
    args = _args("--only", "sst2-seeds", "--sst2-rows", "sentences", "--seeds-method", "p-tuning-v2")
    phrases = {k: v for k, v in record["sst2_seeds"].items() if k != "runs"}  # the oldest shape: one flat record, the phrases one
    args.previous = {"sst2_seeds": {"phrases": phrases, "sentences": prompt}}
    record["sst2_seeds"] = quality.run_sst2_seeds(args, tmp_path)
    assert record["sst2_seeds"]["sentences"]["prompt-tuning"] == prompt  # another method keeps its row
    assert record["sst2_seeds"]["phrases"] == {"prompt-tuning": phrases}  # and other rows theirs
    v2 = record["sst2_seeds"]["sentences"]["p-tuning-v2"]
    assert [r["selection_accuracy"] for r in v2["runs"]] == [0.90, 0.91, 0.92]  # the kept (best) state's, not the last step's
    assert v2["accuracy"] == pytest.approx(0.89) and v2["selection_accuracy"] == pytest.approx(0.91)
    target = quality.targets(record)["sst2_mean_of_seeds_at_least_0.88"]
    assert target["method"] == "p-tuning-v2" and target["met"] is True
    assert target["chosen"]["candidates"] == pytest.approx({"prompt-tuning": 0.89, "p-tuning-v2": 0.91})
    # better on dev but worse on the selection splits: prompt tuning counts, and misses the target
    v2["selection_accuracy"], v2["accuracy"] = 0.85, 0.95
    target = quality.targets(record)["sst2_mean_of_seeds_at_least_0.88"]
    assert (target["method"], target["accuracy"], target["met"]) == ("prompt-tuning", 0.87, False)
    # equal numbers of correct selection rows tie, whatever the last bit of their float means; the first recorded wins
    tie = dict(prompt, selection_accuracy=sum([627, 620, 623]) / 3 / 688)
    first = dict(prompt, selection_accuracy=statistics.mean(k / 688 for k in (627, 616, 627)))
    assert quality.counted_seeds({"sentences": {"prompt-tuning": first, "p-tuning-v2": tie}})[1] is first
    assert quality.counted_seeds({"sentences": {"p-tuning-v2": tie, "prompt-tuning": first}})[1] is tie
    table = quality.readme_table(record)
    assert "| p-tuning-v2 (300 steps × 16, kept state chosen on 10% of train; trained on whole sentences only), seeds 1, 2, 3 | 95.0" in table
    assert "| prompt-tuning (300 steps × 16, kept state chosen on 10% of train; trained on whole sentences only), seeds 1, 2, 3 | 87.0" in table


def _seed_record(runs, method="prompt-tuning"):
    return {"method": method, "steps": 300, "batch_size": 16, "options": [], "selection_percentage": 10, "train_rows": "sentences",
            "seeds": [r["seed"] for r in runs], "accuracy": statistics.mean(r["accuracy"] for r in runs), "accuracy_std": 0.0,
            "runs": runs}


def test_only_records_selected_as_the_target_asks_compete_whatever_their_fields_say():
    counted = _seed_record(_seed_runs([0.88] * 3, rows="sentences"))
    # each selected on other rows, or keeping another state, by its commands as pstar train parses them;
    # its record's own fields say seeds 1, 2, 3 and 10% (they are copied from the counted one) and must not decide
    outside = {
        "one-seed": ["--seed-list", "1"],
        "other-seeds": ["--seed-list", "4", "5", "6"],
        "cut-rows": ["--method-args", "prompt-tuning=--max-train-samples=3000"],
        "percentage-twice": ["--method-args", "prompt-tuning=--validation-split-percentage 20"],  # argparse keeps the last
        "last-state": ["--method-args", "prompt-tuning=--select-best last"],
        "other-train-file": ["--method-args", "prompt-tuning=--train-file pstar_plugins/data/sst2_train_sample.tsv"],
        "other-dev-file": ["--method-args", "prompt-tuning=--validation-file easy_dev.tsv"],
        "cut-dev": ["--method-args", "prompt-tuning=--max-eval-samples 50"],
        "other-model": ["--method-args", "prompt-tuning=--model gpt2"],
    }
    records = {name: dict(counted, runs=_seed_runs([0.99] * 3, *argv, rows="sentences", dev=0.99)) for name, argv in outside.items()}
    for name, record in records.items():  # stored first, with better scores on both splits
        rows, chosen, choice = quality.counted_seeds({"sentences": {name: record, "prompt-tuning": counted}})
        assert (rows, chosen, choice["other_splits"]) == ("sentences", counted, [name]), name
        assert choice["candidates"] == {"prompt-tuning": 0.88}
    # a run whose command is not one pstar train parses says nothing about its splits
    broken = dict(counted, runs=[dict(r, command=r["command"] + " --seed one") for r in counted["runs"]])
    assert quality.counted_seeds({"sentences": {"broken": broken, "prompt-tuning": counted}})[2]["unreadable"] == ["broken"]
    # a plugin module adds methods, not rows: it is not imported, and a flag this machine lacks the means for is not checked
    plugged = dict(counted, runs=[dict(r, command=r["command"].replace("pstar_plugins.train", "pstar_plugins.train -p no_such_plugin_module")
                                       + " --report-to wandb") for r in counted["runs"]])
    rows, chosen, choice = quality.counted_seeds({"sentences": {"prompt-tuning": plugged}})
    assert chosen is plugged and "no_such_plugin_module" not in sys.modules
    # none as the target asks: nothing counts, the target is unmet and says why
    record = dict(_record(), sst2_seeds={"sentences": records})
    assert quality.targets(record)["sst2_mean_of_seeds_at_least_0.88"] == {
        "method": None, "train_rows": "sentences", "met": False,
        "chosen": {"rule": "best mean selection accuracy of the kept states, on the target's selection splits",
                   "other_splits": list(outside)}}
    # on the target's splits but without scores: listed, never counted
    unscored = _seed_record(_seed_runs([None] * 3, rows="sentences", dev=0.99))
    rows, chosen, choice = quality.counted_seeds({"sentences": {"p-tuning-v2": unscored, "prompt-tuning": counted}})
    assert (chosen, choice["not_scored"]) == (counted, ["p-tuning-v2"])
    assert quality.counted_seeds({"sentences": {"p-tuning-v2": unscored}})[1:] == (None, {
        "rule": "best mean selection accuracy of the kept states, on the target's selection splits", "not_scored": ["p-tuning-v2"]})


def test_an_old_rows_selection_score_is_read_off_its_curve_only_when_it_kept_the_best_state():
    best = _old_seed_runs([(0.86, 0.91)], [200])[0]
    assert quality.kept_selection_accuracy(best) == 0.91
    last = dict(best, command=_seed_runs([None], "--method-args", "prompt-tuning=--select-best last")[0]["command"])
    assert quality.kept_selection_accuracy(last) is None  # rows from before 038d58a record the best step as kept, even under last
    # a run without a selection split has no selection score, whatever its curve (which scored dev rows)
    without = dict(best, command=_seed_runs([None], "--selection-percentage", "0")[0]["command"])
    assert quality.kept_selection_accuracy(without) is None
    assert quality.kept_selection_accuracy(dict(best, command="python other.py")) is None
    assert quality.seeds_selection_accuracy([best, without]) is None and quality.seeds_selection_accuracy([]) is None
    assert quality.kept_selection_accuracy(dict(without, selection_accuracy=0.8)) == 0.8  # recorded by the run: read as it is


def test_the_target_splits_are_the_targets_own_seeds_percentage_and_best_state():
    plans = quality.target_splits("sentences")
    assert [p["seed"] for p in plans] == [1, 2, 3]
    assert {(p["validation_split_percentage"], p["select_best"], p["max_train_samples"], p["max_eval_samples"]) for p in plans} == \
           {(10, "best", None, None)}
    assert {p["train_file"] for p in plans} == {"sst2-train-sentences.tsv"}


def test_the_recorded_targets_are_the_ones_the_recorded_rows_give():
    record = json.loads((quality.C.RESULTS / "quality.json").read_text())
    assert record["targets"] == quality.targets(record)

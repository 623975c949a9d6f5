"""Prompting and in-context baselines, and the metrics they report."""

import json
import subprocess
import sys

import pytest
import torch

from pstar_plugins.mechanisms.template import Template
from pstar_plugins.tasks.baselines import (
    accuracy_and_macro_f1,
    balanced_demonstrations,
    calibrate,
    in_context_template,
    render_demonstration,
)
from pstar_plugins.tasks.verbalizer import Verbalizer
from pstar_plugins.testing import tiny_model
from tests.test_tasks import CharTokenizer
from tests.test_train_entry_point import ROOT, needs_model


def test_demonstration_rendering_and_in_context_template():
    t = Template.parse("Review: {sentence} Sentiment: {answer}")
    assert render_demonstration(t, {"sentence": "great"}, "positive") == "Review: great Sentiment: positive"
    icl = in_context_template(t, [({"sentence": "bad"}, "negative"), ({"sentence": "fine"}, "positive")])
    tok = CharTokenizer()
    got = icl.encode({"sentence": "ok"}, tok, stop_at_answer=True, add_special_tokens=False).input_ids
    expected = tok(
        "Review: bad Sentiment: negative\n\nReview: fine Sentiment: positive\n\nReview: ok Sentiment:",
        add_special_tokens=False,
    )["input_ids"]
    assert got == expected


def test_demonstrations_are_class_balanced_and_seeded():
    labels = [0] * 50 + [1] * 10 + [2] * 5
    rows = [{}] * len(labels)
    picks = balanced_demonstrations(rows, labels, 6, 3, seed=1)
    assert sorted(labels[i] for i in picks) == [0, 0, 1, 1, 2, 2] and len(set(picks)) == 6
    assert picks == balanced_demonstrations(rows, labels, 6, 3, seed=1)
    assert picks != balanced_demonstrations(rows, labels, 6, 3, seed=2)


def test_macro_f1_and_accuracy():
    acc, f1 = accuracy_and_macro_f1([0, 0, 1, 1], [0, 1, 1, 1], 2)
    assert acc == 0.75
    assert f1 == pytest.approx((2 / 3 + 0.8) / 2)  # class 0: P=1/2 R=1; class 1: P=1 R=2/3


def test_contextual_calibration_removes_a_constant_bias():
    content_free = torch.tensor([0.8, 0.2])
    biased = torch.log(torch.tensor([[0.8, 0.2], [0.9, 0.1]]))
    calibrated = calibrate(biased, content_free).exp()
    torch.testing.assert_close(calibrated[0], torch.tensor([0.5, 0.5]))
    assert calibrated[1].argmax() == 0


def test_in_context_scores_equal_scoring_the_whole_prompt():
    tok = CharTokenizer()
    model = tiny_model("llama")
    t = Template.parse("R: {sentence} S:{answer}")
    icl = in_context_template(t, [({"sentence": "ab"}, "x")])
    v = Verbalizer(tok, icl, ["x", "y"], masked_lm=False)
    with torch.no_grad():
        scores = v.scores(model, v.encode([{"sentence": "cd"}]))
        ids = tok("R: ab S: x\n\nR: cd S:")["input_ids"]
        for c, word in enumerate(["x", "y"]):
            word_ids = tok(" " + word, add_special_tokens=False)["input_ids"]  # two tokens with this tokenizer
            logp = torch.log_softmax(model(input_ids=torch.tensor([ids + word_ids])).logits[0], -1)
            expected = sum(logp[len(ids) - 1 + k, t] for k, t in enumerate(word_ids))
            torch.testing.assert_close(scores[0, c], expected, rtol=1e-5, atol=1e-5)


@pytest.mark.slow
@needs_model
def test_eval_command_reports_zero_and_few_shot(tiny_dir, tmp_path):
    out = tmp_path / "eval.json"
    cmd = [
        sys.executable,
        "-m",
        "pstar_plugins.cli",
        "eval",
        "--model",
        str(tiny_dir),
        "--shots",
        "0",
        "2",
        "--seeds",
        "2",
        "--max-eval-samples",
        "8",
        "--output",
        str(out),
        "--calibrate",
    ]
    result = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-3000:]
    runs = json.loads(out.read_text())["runs"]
    assert [r["shots"] for r in runs] == [0, 2] and runs[1]["seeds"] == 2
    assert all(0 <= r["accuracy"] <= 1 and 0 <= r["macro_f1"] <= 1 for r in runs)
    assert "2-shot calibrated" in result.stdout


@pytest.mark.parametrize("arch", ["llama", "mistral", "gemma2"])
@pytest.mark.parametrize("words", [["x", "y"], ["xz", "y"]])
def test_shared_prefix_cache_gives_the_scores_of_full_prompts(words, arch):
    """In-context rows run on the demonstrations' cache score exactly as the full prompts do,
    with left padding, single- and multi-token label words, and batches of different sizes. On
    sliding-window families (window 4 tokens, prefix longer) rows of equal length share the cache
    and unequal ones run in full (padding after the prefix would shift the window)."""
    from pstar_plugins.tasks.baselines import SharedPrefixModel, common_prefix
    from pstar_plugins.testing.architectures import tiny_model as tiny_of_family

    tok = CharTokenizer()
    model = tiny_of_family(arch).eval()
    t = Template.parse("R: {sentence} S:{answer}")
    icl = in_context_template(t, [({"sentence": "abab"}, "x"), ({"sentence": "cd"}, "y")])
    v = Verbalizer(tok, icl, words, masked_lm=False)
    rows = [{"sentence": s} for s in ["cd", "efghij", "k", "lmno", "pq"]]
    sample = v.encode(rows[:3]).inputs
    prefix = common_prefix([ids[m.bool()].tolist() for ids, m in zip(sample["input_ids"], sample["attention_mask"])])
    assert len(prefix) > 10
    cached = SharedPrefixModel(model, prefix)
    widths = []  # what the frozen model runs: each batch's own tokens only, after the prefix's call
    model.register_forward_pre_hook(lambda _, args, kw: widths.append(kw["input_ids"].shape[1]), with_kwargs=True)
    with torch.no_grad():
        for batch in (rows[:3], rows[3:], rows, [rows[0], rows[4]]):
            widths.clear()
            got = v.scores(cached, v.encode(batch))
            equal = len({len(r["sentence"]) for r in batch}) == 1
            assert (max(widths) < len(prefix)) == (arch == "llama" or equal), widths
            torch.testing.assert_close(got, v.scores(model, v.encode(batch)), rtol=1e-5, atol=1e-5)


def test_rows_scored_in_length_order_get_their_own_predictions_back():
    """``pstar eval`` scores rows shortest first (little padding) and maps each prediction back to
    its row: the same predictions as scoring them one by one, in the file's order."""
    from pstar_plugins.evaluate import score_rows
    from pstar_plugins.tasks.baselines import in_original_order, length_order

    tok = CharTokenizer()
    model = tiny_model("llama").eval()
    v = Verbalizer(tok, Template.parse("R: {sentence} S:{answer}"), ["x", "y"], masked_lm=False)
    texts = ["abcdefghijkl", "a", "abcdef", "ab", "abcdefghi", "abc", "k", "lmnopqrstu"]
    rows = [{"sentence": s} for s in texts]
    order = length_order(v, rows, max_length=64)
    assert [texts[i] for i in order] == sorted(texts, key=len) and order[:2] == [1, 6]  # ties keep file order
    assert in_original_order(["b", "c", "a"], [1, 2, 0]) == ["a", "b", "c"]
    labels = [0] * len(rows)
    with torch.no_grad():  # scores, not argmaxes, so that a misplaced row cannot pass by chance
        one_by_one = [v.scores(model, v.encode([r]))[0] for r in rows]
        batched = torch.cat(
            [v.scores(model, v.encode([rows[i] for i in order[j : j + 3]])) for j in range(0, len(rows), 3)]
        )
    torch.testing.assert_close(
        torch.stack(in_original_order(list(batched), order)), torch.stack(one_by_one), rtol=1e-5, atol=1e-5
    )
    preds = score_rows(model, v, [rows[i] for i in order], [labels[i] for i in order], 3, 64)
    assert in_original_order(preds, order) == [int(s.argmax()) for s in one_by_one]

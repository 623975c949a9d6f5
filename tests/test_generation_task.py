"""Generation tasks: the loss covers target tokens only; decoding and BLEU/ROUGE-L evaluation."""

import json

import pytest

from pstar_plugins.tasks.generation import bleu_rouge, group_references, training_batch
from pstar_plugins.tasks.template import Template
from tests.test_tasks import CharTokenizer
from tests.test_train_entry_point import _train, needs_model


def test_training_batch_puts_labels_on_the_target_only():
    tok = CharTokenizer()
    tok.eos_token_id = 2
    t = Template.parse("D: {mr} T:{answer}")
    batch = training_batch(t, tok, [{"mr": "ab", "ref": "xy"}, {"mr": "abcd", "ref": "z"}], "ref", 64)
    prompt = tok("D: ab T:")["input_ids"]
    target = tok(" xy", add_special_tokens=False)["input_ids"] + [2]
    assert batch["input_ids"][0, : len(prompt) + len(target)].tolist() == prompt + target
    assert batch["labels"][0].tolist() == [-100] * len(prompt) + target + [-100] * (batch["labels"].shape[1] - len(prompt) - len(target))
    assert (batch["labels"][batch["attention_mask"] == 0] == -100).all()


def test_references_are_grouped_by_source_and_scored_against_all():
    rows = [{"mr": "a", "ref": "the cat sat"}, {"mr": "a", "ref": "a cat sat down"}, {"mr": "b", "ref": "dogs run"}]
    groups = group_references(rows, Template.parse("{mr}{answer}"), "ref")
    assert [g[1] for g in groups] == [["the cat sat", "a cat sat down"], ["dogs run"]]
    perfect = bleu_rouge(["a cat sat down", "dogs run"], [g[1] for g in groups])
    assert perfect["rouge_l"] == pytest.approx(100.0)
    worse = bleu_rouge(["a dog", "cats fly"], [g[1] for g in groups])
    assert worse["bleu"] < perfect["bleu"] and worse["rouge_l"] < perfect["rouge_l"]


@pytest.mark.slow
@needs_model
@pytest.mark.parametrize("method", ["prefix-tuning", "prompt-tuning"])
def test_generation_training_runs_and_reports_bleu(tiny_dir, tmp_path, method):
    train = tmp_path / "train.csv"
    dev = tmp_path / "dev.csv"
    train.write_text('mr,ref\n"name[A], food[Thai]","A serves Thai food."\n"name[B], area[riverside]","B is by the river."\n' * 4)
    dev.write_text('mr,ref\n"name[C], food[Thai]","C serves Thai food."\n"name[C], food[Thai]","Thai food at C."\n')
    result = _train(tiny_dir, tmp_path / "run", "--task", "generation", "--method", method, "--train-file", str(train),
                    "--validation-file", str(dev), "--template", "Data: {mr}\\nText:{answer}", "--max-new-tokens", "6")
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["metric"] == "bleu" and metrics["generation_scores"]["final eval"]["sources"] == 1
    assert len(metrics["history"]["loss"]) == 3 and all(l == l for l in metrics["history"]["loss"])

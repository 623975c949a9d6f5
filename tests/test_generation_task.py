"""Generation tasks: the loss covers target tokens only; decoding and BLEU/ROUGE-L evaluation."""

import json

import pytest
import torch

from pstar_plugins.mechanisms.template import Template
from pstar_plugins.tasks.generation import bleu_rouge, group_references, training_batch
from tests.test_tasks import CharTokenizer
from tests.test_train_entry_point import _train, needs_model


def test_training_batch_aligns_targets_and_labels_only_them():
    tok = CharTokenizer()
    tok.eos_token_id = 2
    t = Template.parse("D: {mr} T:{answer}")
    batch = training_batch(t, tok, [{"mr": "ab", "ref": "xy"}, {"mr": "abcd", "ref": "z"}], "ref", 64)
    prompts = [tok("D: ab T:")["input_ids"], tok("D: abcd T:")["input_ids"]]
    targets = [
        tok(" xy", add_special_tokens=False)["input_ids"] + [2],
        tok(" z", add_special_tokens=False)["input_ids"] + [2],
    ]
    width = max(map(len, prompts))
    for i, (prompt, target) in enumerate(zip(prompts, targets)):
        real = batch["attention_mask"][i].bool()
        assert batch["input_ids"][i][real].tolist() == prompt + target
        assert batch["labels"][i, width : width + len(target)].tolist() == target  # every target starts at one column
        assert (batch["labels"][i, :width] == -100).all() and (batch["labels"][i, width + len(target) :] == -100).all()
    assert (batch["labels"][batch["attention_mask"] == 0] == -100).all()


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize(
    "method,options",
    [
        ("prompt-tuning", {}),
        ("prompt-tuning", {"position": "after_bos"}),
        ("prefix-tuning", {}),
        ("p-tuning", {"template": "{soft:2} D: {mr} {soft} T:{answer}"}),
        ("p-tuning-v2", {"head": "none"}),
    ],
)
def test_target_token_loss_equals_the_models_own_loss_and_gradients(arch, method, options):
    """Logits only at target-predicting columns give the same loss and gradients as the full-logit loss."""
    from pstar_plugins.tasks.generation import target_token_loss
    from tests.helpers import make

    torch.manual_seed(0)
    tok = CharTokenizer()
    tok.eos_token_id = 2
    model = make(arch, method, **options)
    template = Template.parse(options.get("template", "D: {mr} T:{answer}"))
    rows = [{"mr": "ab", "ref": "xyz"}, {"mr": "abcdef", "ref": "z"}, {"mr": "a", "ref": "hello"}]
    batch = training_batch(template, tok, rows, "ref", 64)
    fast = target_token_loss(model, batch)
    fast.backward()
    fast_grads = [p.grad.clone() for p in model.parameters() if p.requires_grad]
    model.zero_grad()
    full = model(**batch).loss
    full.backward()
    assert torch.allclose(fast, full, atol=1e-5), (fast.item(), full.item())
    for a, b in zip(fast_grads, [p.grad for p in model.parameters() if p.requires_grad]):
        assert torch.allclose(a, b, atol=1e-6, rtol=1e-4)


def test_training_batch_truncates_from_the_prompt_start():
    tok = CharTokenizer()
    tok.eos_token_id = 2
    batch = training_batch(Template.parse("{mr}{answer}"), tok, [{"mr": "abcdefgh", "ref": "xy"}], "ref", 6)
    assert batch["input_ids"].shape[1] == 6
    assert (batch["labels"] != -100).sum() >= 1  # a target token survives


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
    train.write_text(
        'mr,ref\n"name[A], food[Thai]","A serves Thai food."\n"name[B], area[riverside]","B is by the river."\n' * 4
    )
    dev.write_text('mr,ref\n"name[C], food[Thai]","C serves Thai food."\n"name[C], food[Thai]","Thai food at C."\n')
    result = _train(
        tiny_dir,
        tmp_path / "run",
        "--task",
        "generation",
        "--method",
        method,
        "--train-file",
        str(train),
        "--validation-file",
        str(dev),
        "--template",
        "Data: {mr}\\nText:{answer}",
        "--max-new-tokens",
        "6",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["metric"] == "bleu" and metrics["generation_scores"]["final eval"]["sources"] == 1
    assert len(metrics["history"]["loss"]) == 3 and all(x == x for x in metrics["history"]["loss"])

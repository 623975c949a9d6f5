"""One fast-path decision per built model (mechanisms/fast_paths.py): decided once at build time,
read by every call site, decided again only when ZeRO-3 partitions the weights."""

from __future__ import annotations

import argparse

import pytest
import torch

from pstar_plugins import build_model
from pstar_plugins.mechanisms import fast_paths
from pstar_plugins.mechanisms.template import Template
from pstar_plugins.tasks.verbalizer import Verbalizer, recording
from pstar_plugins.testing.architectures import tiny_model
from pstar_plugins.train.report import summary_text
from tests.test_label_words import METHODS, ROWS, TEMPLATE, TOKENIZER, WORDS


def test_every_call_site_reads_the_record_decided_at_build(monkeypatch):
    decided = []
    real = fast_paths.decide
    monkeypatch.setattr(fast_paths, "decide", lambda *a, **k: decided.append(a) or real(*a, **k))
    model = build_model(tiny_model("llama"), "prompt-tuning", num_virtual_tokens=3, init="random")
    assert len(decided) == 1 and model.fast_paths == real(model.base_model, model.method)
    model.packing = True
    ids = torch.randint(3, 100, (3, 6))
    mask = torch.ones_like(ids)
    mask[0, :2] = 0
    model.train()
    model(input_ids=ids, attention_mask=mask, logits_to_keep=1)  # packing
    model.eval()
    with torch.no_grad():
        model(input_ids=ids, attention_mask=mask, logits_to_keep=1)  # the prompt cache
        model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=2, do_sample=False)  # packed prefill
    verbalizer = Verbalizer(TOKENIZER, Template.parse(TEMPLATE), WORDS, masked_lm=False)
    with torch.no_grad(), recording() as paths:
        verbalizer.scores(model, verbalizer.encode(ROWS))  # one-pass scoring
    assert paths == ["one pass"]
    assert len(decided) == 1, "a call site decided a fast path again instead of reading the model's record"


@pytest.mark.parametrize("method", [*METHODS, "p-tuning-v2 with a head"])
def test_every_method_keeps_the_one_record_decided_at_build(monkeypatch, method):
    """Training and scoring calls of every method read the build's record, P-tuning v2's calls of
    the backbone without the LM head included."""
    decided = []
    real = fast_paths.decide
    monkeypatch.setattr(fast_paths, "decide", lambda *a, **k: decided.append(a) or real(*a, **k))
    head = method == "p-tuning-v2 with a head"
    options, template = (
        (dict(num_virtual_tokens=3, head="sequence-classification"), TEMPLATE) if head else METHODS[method]
    )
    model = build_model(tiny_model("llama"), method.split()[0], tokenizer=TOKENIZER, **options)
    model.packing = True
    verbalizer = Verbalizer(TOKENIZER, Template.parse(template), WORDS, masked_lm=False)
    encoded = verbalizer.encode(ROWS)
    if head:
        model.train()
        model(**encoded.inputs, labels=torch.tensor([0, 1, 0])).loss.backward()
    else:
        model.train()
        verbalizer.scores(model, encoded).sum().backward()
        model.eval()
        with torch.no_grad():
            verbalizer.scores(model, encoded)
    assert len(decided) == 1, decided


def test_the_record_is_decided_again_when_zero3_partitions_the_weights():
    model = build_model(tiny_model("llama"), "prefix-tuning", num_virtual_tokens=3)
    before = model.fast_paths
    assert before is model.fast_paths and before.packed_prefill is None and before.one_pass_scoring is None
    weight = next(model.base_model.parameters())
    weight.ds_id = 0  # how DeepSpeed marks a partitioned parameter (Accelerate's prepare, after the build)
    try:
        after = model.fast_paths
        assert after.partitioned and after.packed_prefill == after.one_pass_scoring == "ZeRO-3 partitioned weights"
        assert after.packing is None  # packed calls do not depend on the batch: every rank runs the same calls
    finally:
        del weight.ds_id
    assert model.fast_paths == before


def test_the_record_says_why_a_path_does_not_apply():
    seq2seq = build_model(tiny_model("t5"), "prefix-tuning", num_virtual_tokens=3).fast_paths
    assert seq2seq.packing == "encoder-decoder model" and seq2seq.one_pass_scoring == "not a decoder-only causal LM"
    head = build_model(tiny_model("gpt2"), "p-tuning-v2", num_virtual_tokens=3).fast_paths
    assert head.prompt_cache == "method PTuningV2 keeps its virtual tokens in the sequence"
    assert head.one_pass_scoring == "PTuningV2 with a classification head scores through its head"
    assert head.lines()[0] == "packing: applies"
    assert (
        head.lines()[3]
        == "one pass scoring: does not apply (PTuningV2 with a classification head scores through its head)"
    )


def test_the_run_summary_shows_the_record():
    model = build_model(tiny_model("t5"), "prefix-tuning", num_virtual_tokens=3)
    args = argparse.Namespace(method="prefix-tuning", model="t5", task="classification")
    results = {
        "steps": 1,
        "examples_seen": 2,
        "train_rows": 2,
        "tuned_accuracy": 0.5,
        "fast_paths": model.fast_paths.lines(),
    }
    text = summary_text(args, results, "accuracy", [])
    assert "fast paths             : packing: does not apply (encoder-decoder model)" in text
    assert "one pass scoring: does not apply (not a decoder-only causal LM)" in text

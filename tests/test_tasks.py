"""Templates, data files and the verbalizer scorer."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from pstar_plugins import build_model
from pstar_plugins.contract.errors import ConfigError, DataError, PStarError
from pstar_plugins.mechanisms.template import Answer, Field, Literal, Soft, Template
from pstar_plugins.tasks.data import labels_of, read_examples
from pstar_plugins.tasks.verbalizer import Verbalizer
from pstar_plugins.testing import tiny_model


class CharTokenizer:
    """A deterministic tokenizer for tests: one id per character (BOS=1 is added)."""

    pad_token_id = 0
    mask_token_id = 4
    all_special_ids = [0, 1, 4]

    def __call__(self, text, add_special_tokens=True):
        ids = [5 + (ord(c) % 80) for c in text]
        return {"input_ids": ([1] + ids) if add_special_tokens else ids}


def test_template_parses_slots_soft_tokens_and_escapes():
    t = Template.parse("{soft:2} Review: {sentence} {{x}} {soft} Sentiment:{answer}")
    assert t.parts == [
        Soft(2),
        Literal(" Review: "),
        Field("sentence"),
        Literal(" {x} "),
        Soft(1),
        Literal(" Sentiment:"),
        Answer(),
    ]
    assert t.num_soft_tokens == 3 and t.fields == ["sentence"] and t.has_answer


@pytest.mark.parametrize(
    "text,match",
    [
        ("Sentiment:{answer}", "no text slot"),
        ("{sentence} {label words}", "unknown slot"),
        ("{sentence} {answer} {answer}", "more than one"),
        ("{sentence} {soft:0}", "positive count"),
        ("{sentence} }", "unmatched"),
    ],
)
def test_bad_templates_name_the_problem(text, match):
    with pytest.raises(ConfigError, match=match):
        Template.parse(text)


def test_prompt_tuning_refuses_zero_length():
    with pytest.raises(ConfigError, match="num_virtual_tokens=0"):
        build_model(tiny_model("llama"), "prompt-tuning", num_virtual_tokens=0)


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=40))
def test_template_parser_raises_only_library_errors(text):
    try:
        Template.parse(text)
    except PStarError:
        pass


def test_encode_marks_soft_positions_and_answer():
    tok = CharTokenizer()
    t = Template.parse("{soft:2}ab{sentence}{soft}c {answer}")
    enc = t.encode({"sentence": "xy"}, tok, answer_ids=[9], stop_at_answer=False)
    # BOS, 2 soft, "abxy", 1 soft, "c" (trailing space moved into the answer), answer
    assert enc.slots == [-1, 0, 1, -1, -1, -1, -1, 2, -1, -1]
    assert enc.answer_index == 9 and enc.input_ids[9] == 9
    with pytest.raises(DataError, match="not a column"):
        t.encode({"text": "x"}, tok)


def test_read_examples_formats_and_errors(tmp_path):
    tsv = tmp_path / "a.tsv"
    tsv.write_text('sentence\tlabel\nit \'s "fine" . \t1\nbad \t0\n', encoding="utf-8")
    rows = read_examples(tsv)
    assert rows == [{"sentence": 'it \'s "fine" .', "label": "1"}, {"sentence": "bad", "label": "0"}]
    assert labels_of(rows, "label", str(tsv), ["negative", "positive"]) == [1, 0]
    jsonl = tmp_path / "b.jsonl"
    jsonl.write_text('{"s": "x", "label": "positive"}\n{"s": \n', encoding="utf-8")
    with pytest.raises(DataError, match="row 2 is not valid JSON"):
        read_examples(jsonl)
    with pytest.raises(DataError, match="label 'maybe'"):
        labels_of([{"label": "maybe"}], "label", "f.tsv", ["negative", "positive"])
    bad = tmp_path / "c.tsv"
    bad.write_bytes(b"sentence\tlabel\n\xff\xfe\t1\n")
    with pytest.raises(DataError, match="line 2 is not valid UTF-8"):
        read_examples(bad)
    empty = tmp_path / "d.csv"
    empty.write_text("")
    with pytest.raises(DataError, match="empty"):
        read_examples(empty)


@settings(max_examples=100, deadline=None)
@given(st.binary(max_size=200), st.sampled_from([".tsv", ".csv", ".jsonl"]))
def test_data_reader_raises_only_library_errors(tmp_path_factory, data, suffix):
    path = tmp_path_factory.mktemp("fuzz") / f"f{suffix}"
    path.write_bytes(data)
    try:
        read_examples(path)
    except PStarError:
        pass


@pytest.mark.parametrize("words", [["good", "bad"], ["good", "not good at all"]])
def test_verbalizer_scores_equal_a_direct_log_probability(words):
    """Single- and multi-token label words score log p(word | text) under the (prompted) model."""
    tok = CharTokenizer()
    model = build_model(tiny_model("llama"), "prompt-tuning", num_virtual_tokens=3, init="random").eval()
    template = Template.parse("T: {sentence} =>{answer}")
    verbalizer = Verbalizer(tok, template, words, masked_lm=False)
    examples = [{"sentence": "short"}, {"sentence": "a much longer one"}]
    with torch.no_grad():
        scores = verbalizer.scores(model, verbalizer.encode(examples))
        for i, ex in enumerate(examples):
            prefix = template.encode(ex, tok, stop_at_answer=True).input_ids
            for c, word in enumerate(words):
                ids = tok(" " + word, add_special_tokens=False)["input_ids"]
                full = torch.tensor([prefix + ids])
                logp = torch.log_softmax(model(input_ids=full).logits[0], -1)
                expected = sum(logp[len(prefix) - 1 + k, t] for k, t in enumerate(ids))
                torch.testing.assert_close(scores[i, c], expected, rtol=1e-4, atol=1e-4)

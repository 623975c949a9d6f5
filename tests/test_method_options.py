"""Method options that the equivalence tests do not cover: initialisations, heads, MLM verbalizer."""

import pytest
import torch

from pstar_plugins import build_model
from pstar_plugins.contract.errors import ConfigError, IncompatibleModelError
from pstar_plugins.mechanisms.template import Template
from pstar_plugins.tasks.verbalizer import Verbalizer
from pstar_plugins.testing import random_batch, tiny_model
from tests.test_tasks import CharTokenizer


def test_prompt_init_from_text_copies_the_text_embeddings():
    tok = CharTokenizer()
    base = tiny_model("llama")
    model = build_model(base, "prompt-tuning", tokenizer=tok, num_virtual_tokens=5, init="text", init_text="abc")
    ids = tok("abc", add_special_tokens=False)["input_ids"]
    expected = base.get_input_embeddings().weight[[ids[i % 3] for i in range(5)]]
    assert torch.equal(model.method.prompt[0], expected)


def test_prompt_init_from_labels_then_vocab():
    tok = CharTokenizer()
    base = tiny_model("llama")
    model = build_model(
        base, "prompt-tuning", tokenizer=tok, num_virtual_tokens=4, init="labels", label_words=["ab", "c"]
    )
    emb = base.get_input_embeddings().weight
    ab = tok(" ab", add_special_tokens=False)["input_ids"]
    torch.testing.assert_close(model.method.prompt[0, 0], emb[ab].mean(0))
    vocab_rows = model.method.prompt[0, 2:]
    assert all(any(torch.equal(r, e) for e in emb) for r in vocab_rows)  # sampled from the vocabulary


def test_text_init_without_tokenizer_is_a_clear_error():
    with pytest.raises(ConfigError, match="pass tokenizer="):
        build_model(tiny_model("llama"), "prompt-tuning", init="text", init_text="hello")


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize("method", ["prefix-tuning", "p-tuning-v2"])
def test_prefix_init_from_text_is_the_texts_kv_cache(arch, method):
    """A prefix initialised from a text acts exactly like the text placed before the input."""
    tok = CharTokenizer()
    base = tiny_model(arch)
    text = tok("a review", add_special_tokens=False)["input_ids"]
    m = 6  # the text is cut to m tokens
    options = {"head": "none"} if method == "p-tuning-v2" else {}
    model = build_model(
        base,
        method,
        tokenizer=tok,
        num_virtual_tokens=m,
        projection=False,
        init="text",
        init_text="a review",
        **options,
    )
    x = random_batch(2, 5)
    mask = torch.ones_like(x)
    with torch.no_grad():
        ours = model(input_ids=x, attention_mask=mask, position_ids=torch.arange(m, m + 5).expand(2, 5)).logits
        model.method.detach(base)
        joined = torch.cat([torch.tensor(text[:m]).expand(2, m), x], 1)
        reference = base(input_ids=joined).logits[:, m:]
    torch.testing.assert_close(ours, reference, atol=1e-5, rtol=1e-4)


def test_prefix_init_from_text_refuses_projection_and_empty_text():
    tok = CharTokenizer()
    with pytest.raises(ConfigError, match="--projection false"):
        build_model(tiny_model("llama"), "prefix-tuning", tokenizer=tok, init="text", init_text="hello")
    with pytest.raises(ConfigError, match="non-empty init_text"):
        build_model(tiny_model("llama"), "prefix-tuning", tokenizer=tok, projection=False, init="text")
    with pytest.raises(ConfigError, match="pass tokenizer="):
        build_model(tiny_model("llama"), "prefix-tuning", projection=False, init="text", init_text="hello")


def test_token_classification_head_ignores_padding():
    model = build_model(
        tiny_model("bert"), "p-tuning-v2", head="token-classification", num_labels=4, classifier_dropout=0.0
    )
    ids = random_batch(2, 6)
    mask = torch.ones_like(ids)
    mask[1, 4:] = 0
    labels = torch.randint(0, 4, (2, 6))
    out = model(input_ids=ids, attention_mask=mask, labels=labels)
    assert out.logits.shape == (2, 6, 4)
    flat = labels.masked_fill(mask == 0, -100)
    manual = torch.nn.functional.cross_entropy(out.logits.flatten(0, 1), flat.flatten(), ignore_index=-100)
    torch.testing.assert_close(out.loss, manual)
    out.loss.backward()
    assert model.method.head.weight.grad.abs().sum() > 0


def test_p_tuning_v2_layer_subset_only_prompts_those_layers():
    model = build_model(tiny_model("llama"), "p-tuning-v2", layers=[-1], num_virtual_tokens=2)
    assert model.method.tables["self"].geometry.n_layers == 1
    assert model.method.injector.layer_map["self"] == [None, 0]
    with pytest.raises(IncompatibleModelError, match="layers \\[5\\] do not exist"):
        build_model(tiny_model("llama"), "p-tuning-v2", layers=[5])


def test_p_tuning_v2_head_refused_on_encoder_decoder():
    with pytest.raises(IncompatibleModelError, match="encoder-only and decoder-only"):
        build_model(tiny_model("t5"), "p-tuning-v2")


def test_masked_lm_verbalizer_reads_the_mask_positions():
    tok = CharTokenizer()
    model = build_model(
        tiny_model("bert"), "p-tuning", template="{soft:2} {sentence} is{answer} .", init="random"
    ).eval()
    template = Template.parse(model.method_config.template)
    words = ["ok", "bad"]  # 3 and 4 characters: multi-token words on the character tokenizer
    verbalizer = Verbalizer(tok, template, words, masked_lm=True)
    batch = verbalizer.encode([{"sentence": "fun"}, {"sentence": "a dull one"}])
    n_mask = 4
    with torch.no_grad():
        scores = verbalizer.scores(model, batch)
        logp = torch.log_softmax(model(**batch.inputs).logits, -1)
    for i in range(2):
        at = int(batch.answer_index[i])
        assert batch.inputs["input_ids"][i, at : at + n_mask].tolist() == [4] * n_mask
        for c, word in enumerate(words):
            ids = tok(" " + word, add_special_tokens=False)["input_ids"]
            expected = torch.stack([logp[i, at + k, t] for k, t in enumerate(ids)]).mean()
            torch.testing.assert_close(scores[i, c], expected)


def test_flash_attention_model_is_refused_for_prefix_methods():
    base = tiny_model("llama")
    base.config._attn_implementation = "flash_attention_2"
    with pytest.raises(IncompatibleModelError, match="attn_implementation='sdpa'"):
        build_model(base, "prefix-tuning")


class WordTokenizer(CharTokenizer):
    """CharTokenizer without the leading space's token, so words' first tokens differ."""

    def __call__(self, text, add_special_tokens=True):
        return super().__call__(text.lstrip(" "), add_special_tokens)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_head_from_label_words_starts_with_the_verbalizers_class_scores(arch):
    """The p-tuning-v2 head initialised from the label words' output rows gives the same class
    distribution as scoring the label words with the LM head, for the same deep prompts."""
    tok = WordTokenizer()
    words = ["ab", "c", "d"]
    with_head = build_model(
        tiny_model(arch),
        "p-tuning-v2",
        tokenizer=tok,
        num_virtual_tokens=3,
        num_labels=3,
        label_words=words,
        head_init="label-words",
        classifier_dropout=0.0,
    )
    lm = build_model(tiny_model(arch), "p-tuning-v2", tokenizer=tok, num_virtual_tokens=3, head="none")
    prefixes = {k: v for k, v in with_head.method.trainable_state().items() if not k.startswith("head.")}
    lm.method.load_trainable_state(prefixes)
    first = [tok(" " + w, add_special_tokens=False)["input_ids"][0] for w in words]
    ids = random_batch(2, 7, seed=3)
    mask = torch.ones_like(ids)
    mask[0, :2] = 0  # left padding
    with_head.eval(), lm.eval()
    with torch.no_grad():
        head_logits = with_head(input_ids=ids, attention_mask=mask).logits
        word_logits = lm(input_ids=ids, attention_mask=mask).logits[:, -1, first]
    torch.testing.assert_close(head_logits.log_softmax(-1), word_logits.float().log_softmax(-1), rtol=1e-5, atol=1e-5)


def test_head_init_auto_is_random_where_the_pooled_position_is_not_the_answer_position():
    tok = WordTokenizer()
    torch.manual_seed(0)
    mean_pooled = build_model(
        tiny_model("llama"),
        "p-tuning-v2",
        tokenizer=tok,
        num_virtual_tokens=3,
        num_labels=2,
        label_words=["ab", "c"],
        pooling="mean",
    )
    rows = tiny_model("llama").get_output_embeddings().weight
    assert not any(torch.allclose(mean_pooled.method.head.weight[0], r) for r in rows)
    with pytest.raises(ConfigError, match="head_init='label-words' needs a decoder-only model"):
        build_model(
            tiny_model("bert"),
            "p-tuning-v2",
            tokenizer=tok,
            num_virtual_tokens=3,
            num_labels=2,
            label_words=["ab", "c"],
            head_init="label-words",
        )
    with pytest.raises(ConfigError, match="needs one label word per class: got 1 words for num_labels=2"):
        build_model(
            tiny_model("llama"),
            "p-tuning-v2",
            tokenizer=tok,
            num_virtual_tokens=3,
            num_labels=2,
            label_words=["ab"],
            head_init="label-words",
        )
    with pytest.raises(ConfigError, match="share first tokens"):
        build_model(
            tiny_model("llama"),
            "p-tuning-v2",
            tokenizer=tok,
            num_virtual_tokens=3,
            num_labels=2,
            label_words=["ab", "ac"],
            head_init="label-words",
        )
    from pstar_plugins.methods.p_tuning_v2 import PTuningV2, PTuningV2Config

    with pytest.raises(ConfigError, match="share first tokens"):  # what pstar train asks before the model loads
        PTuningV2.check_tokenizer(PTuningV2Config(num_labels=2, label_words=["ab", "ac"], head_init="label-words"), tok)
    PTuningV2.check_tokenizer(PTuningV2Config(num_labels=2, label_words=["ab", "ac"]), tok)  # auto falls back instead
    PTuningV2.check_tokenizer(PTuningV2Config(num_labels=2, label_words=["ab", "c"], head_init="label-words"), tok)
    saved = PTuningV2Config(num_labels=2, label_words=["ab", "ac"], head_init="label-words")
    PTuningV2.check_tokenizer(saved.for_loading(), tok)  # an adapter's head is loaded, not initialised from the words
    with pytest.raises(
        ConfigError, match="pooling='mean' reads another: pass --pooling last"
    ):  # no model needed to say so
        PTuningV2Config.from_dict({"head_init": "label-words", "pooling": "mean"})
    shared = build_model(
        tiny_model("llama"), "p-tuning-v2", tokenizer=tok, num_virtual_tokens=3, num_labels=2, label_words=["ab", "ac"]
    )  # auto: rows that would start equal are not used
    assert not torch.equal(shared.method.head.weight[0], shared.method.head.weight[1])

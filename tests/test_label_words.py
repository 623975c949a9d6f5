"""Multi-token label words scored in one pass (the input once with its KV cache, every class's
continuation once from it) equal the per-class loop (each word appended to the whole input), in
value and in the gradients of the trainable prompt tensors, for every method and verified family."""

from __future__ import annotations

import pytest
import torch

from pstar_plugins.assembly.build import build_model
from pstar_plugins.contract.errors import IncompatibleModelError
from pstar_plugins.mechanisms import fast_paths, packing
from pstar_plugins.mechanisms.fast_paths import ONE_PASS_FAMILIES
from pstar_plugins.mechanisms.template import Template
from pstar_plugins.tasks.verbalizer import Verbalizer, one_pass_unsupported_reason, recording
from pstar_plugins.testing.architectures import tiny_config, tiny_model


class SpaceMergingTokenizer:
    """One id per character, except that a space merges with the character after it (as BPE
    vocabularies do with a leading space), so ``" a"`` is one token, ``" bc"`` two, ``" def"`` three.
    BOS = 1 is added; ids stay below the tiny models' vocabulary of 96."""

    pad_token_id = 0
    mask_token_id = 4

    def __call__(self, text, add_special_tokens=True):
        ids, i = [], 0
        while i < len(text):
            if text[i] == " " and i + 1 < len(text):
                ids.append(45 + ord(text[i + 1]) % 40)
                i += 2
            else:
                ids.append(5 + ord(text[i]) % 40)
                i += 1
        return {"input_ids": ([1] + ids) if add_special_tokens else ids}


TOKENIZER = SpaceMergingTokenizer()
WORDS = ["a", "bc", "def"]  # 1, 2 and 3 tokens
# left-padded rows of different lengths
ROWS = [{"sentence": "x"}, {"sentence": "a much longer one"}, {"sentence": "mid len"}]
TEMPLATE = "T: {sentence} =>{answer}"
SOFT_TEMPLATE = "{soft:2} T: {sentence} {soft} =>{answer}"  # P-tuning's soft slots (prompt_index)
METHODS = {
    "prompt-tuning": (dict(num_virtual_tokens=3, init="random"), TEMPLATE),
    "prefix-tuning": (dict(num_virtual_tokens=3), TEMPLATE),
    "p-tuning": (dict(template=SOFT_TEMPLATE), SOFT_TEMPLATE),
    "p-tuning-v2": (dict(num_virtual_tokens=3, head="none"), TEMPLATE),
}


def test_the_words_have_one_two_and_three_tokens():
    assert [len(ids) for ids in Verbalizer(TOKENIZER, Template.parse(TEMPLATE), WORDS, masked_lm=False).words] == [
        1,
        2,
        3,
    ]


def prompted(arch: str, method: str, packing: bool, seed: int = 0, **extra):
    options, template = METHODS[method]
    model = build_model(tiny_model(arch, seed=seed), method, **{**options, **extra})
    model.packing = packing
    with torch.no_grad():  # move the prompt away from its initialisation: an ignored prompt cannot hide
        for p in model.method.parameters():
            p.add_(torch.randn_like(p) * 0.5)
    return model, Verbalizer(TOKENIZER, Template.parse(template), WORDS, masked_lm=False)


def trainable(model) -> list[torch.Tensor]:
    return [p for p in model.parameters() if p.requires_grad]


def assert_same_scores_and_gradients(model, verbalizer, rows=ROWS, expect="one pass", gradients=True, input_call=None):
    """``input_call``: what ``mechanisms.packing`` must record for the input's call ("packed", or the
    reason it ran padded); ``None``: not checked."""
    batch = verbalizer.encode(rows)
    with recording() as paths, packing.recording() as calls:
        fast = verbalizer.scores(model, batch)
    assert paths == [expect]
    if input_call is not None:
        assert calls[:1] == [f"call: {input_call}"], calls
    reference = verbalizer.scores_per_class(model, batch)
    torch.testing.assert_close(fast, reference, rtol=1e-5, atol=1e-5)
    if not gradients:
        return
    params = trainable(model)
    # a loss that weighs classes differently, so that each class's gradient counts
    weights = torch.tensor([1.0, -2.0, 3.0])
    fast_grads = torch.autograd.grad((fast * weights).sum(), params)
    reference_grads = torch.autograd.grad((reference * weights).sum(), params)
    for name, a, b in zip([n for n, p in model.named_parameters() if p.requires_grad], fast_grads, reference_grads):
        assert b.abs().max() > 0, name  # the prompt reaches the scores
        # float rounding grows with the gradient's size (and differs between a packed and a padded call)
        scale = max(1.0, float(b.abs().max()))
        torch.testing.assert_close(a, b, rtol=1e-4, atol=5e-6 * scale, msg=lambda m: f"{name}: {m}")


#: one family per way the input's cache is kept (every verified family runs the suite's
#: one_pass_scoring check in the matrix): GQA rotary, learned positions with a fused head, mixed
#: full and sliding layers, sliding layers with soft-capped logits
FAMILIES = ["llama", "gpt2", "qwen3", "gemma3_text"]


@pytest.mark.parametrize("packing", [False, True], ids=["padded", "packing"])
@pytest.mark.parametrize("method", list(METHODS))
@pytest.mark.parametrize("arch", FAMILIES)
def test_one_pass_equals_the_per_class_loop(arch, method, packing):
    model, verbalizer = prompted(arch, method, packing)
    model.train()  # training mode, as in a step (the tiny configs and these methods have no dropout)
    # with packing on, the input's call runs packed and returns its cache in the padded layout; with
    # sliding-window layers it runs padded over a cache of whole layers, windowed by the model's masks
    sliding = fast_paths.has_sliding_layers(model.config)
    expect = (
        "padded (a KV cache is passed in)"
        if packing and sliding
        else "packed"
        if packing
        else "padded (packing is off)"
    )
    assert_same_scores_and_gradients(model, verbalizer, input_call=expect)


def test_every_family_verified_padding_free_is_verified_for_one_pass_scoring():
    assert ONE_PASS_FAMILIES == set(fast_paths.PADDING_FREE_FAMILIES) >= set(FAMILIES)


def test_a_window_that_bites_is_honoured_in_one_pass():
    """Rows longer than the window: a key more than ``window`` columns back is hidden from the
    continuation as from the per-class call (tiny configs' windows are longer than their rows)."""
    auto, config = tiny_config("qwen2")
    values = {**config.to_dict(), "use_sliding_window": True, "sliding_window": 3, "max_window_layers": 1}
    values.pop("layer_types")
    windowed = auto.from_config(type(config)(**values), attn_implementation="sdpa").eval()
    model = build_model(windowed, "prefix-tuning", num_virtual_tokens=3)
    verbalizer = Verbalizer(TOKENIZER, Template.parse(TEMPLATE), WORDS, masked_lm=False)
    assert_same_scores_and_gradients(model, verbalizer, input_call=None)
    wide = build_model(
        auto.from_config(type(config)(**{**values, "sliding_window": 1000}), attn_implementation="sdpa").eval(),
        "prefix-tuning",
        num_virtual_tokens=3,
    )
    wide.method.load_state_dict(model.method.state_dict())
    batch = verbalizer.encode(ROWS)
    with torch.no_grad():
        assert not torch.allclose(verbalizer.scores(wide, batch), verbalizer.scores(model, batch), atol=1e-3)


@pytest.mark.parametrize("method", list(METHODS))
def test_one_pass_at_inference_equals_the_loop(method):
    """Under no_grad with packing on the loop takes the inference fast paths (prompt tuning's
    prompt cache, packed calls); the one-pass scores still equal it."""
    model, verbalizer = prompted("llama", method, packing=True)
    model.eval()
    batch = verbalizer.encode(ROWS)
    with torch.no_grad(), recording() as paths:
        torch.testing.assert_close(
            verbalizer.scores(model, batch), verbalizer.scores_per_class(model, batch), rtol=1e-5, atol=1e-5
        )
    assert paths == ["one pass"]


def test_prompt_tuning_after_bos_equals_the_loop():
    model, verbalizer = prompted("llama", "prompt-tuning", packing=True, position="after_bos")
    assert_same_scores_and_gradients(model, verbalizer)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_bare_and_disabled_models_equal_the_loop(arch):
    """Zero-shot scoring: the frozen model itself, and a wrapped model with its method switched off."""
    base = tiny_model(arch)
    verbalizer = Verbalizer(TOKENIZER, Template.parse(TEMPLATE), WORDS, masked_lm=False)
    with torch.no_grad():
        assert_same_scores_and_gradients(base, verbalizer, gradients=False)
    model, _ = prompted(arch, "prefix-tuning", packing=True)
    with torch.no_grad(), model.disable_adapter():
        batch = verbalizer.encode(ROWS)
        with recording() as paths:
            off = verbalizer.scores(model, batch)
        assert paths == ["one pass"]
        torch.testing.assert_close(off, verbalizer.scores_per_class(model, batch), rtol=1e-5, atol=1e-5)


def test_shared_prefix_model_scores_in_one_pass_and_keeps_its_cache():
    """In-context rows on the demonstrations' cache: one pass equals the loop on the full prompts,
    batch after batch (the demonstrations' cache is left as it was)."""
    from pstar_plugins.tasks.baselines import SharedPrefixModel, common_prefix, in_context_template

    model = tiny_model("llama")
    icl = in_context_template(Template.parse(TEMPLATE), [({"sentence": "abab"}, "bc"), ({"sentence": "cd"}, "a")])
    verbalizer = Verbalizer(TOKENIZER, icl, WORDS, masked_lm=False)
    sample = verbalizer.encode(ROWS).inputs
    prefix = common_prefix([ids[m.bool()].tolist() for ids, m in zip(sample["input_ids"], sample["attention_mask"])])
    assert len(prefix) > 10
    cached = SharedPrefixModel(model, prefix)
    with torch.no_grad():
        for rows in (ROWS[:2], ROWS, ROWS[1:]):
            batch = verbalizer.encode(rows)
            with recording() as paths:
                fast = verbalizer.scores(cached, batch)
            assert paths == ["one pass"]
            torch.testing.assert_close(fast, verbalizer.scores_per_class(model, batch), rtol=1e-5, atol=1e-5)
            assert cached._cache.get_seq_length() == len(prefix)


def test_an_unverified_family_is_scored_per_class_and_says_why():
    model, verbalizer = prompted("bloom", "prompt-tuning", packing=True)
    reason = one_pass_unsupported_reason(model)
    assert reason == "model type 'bloom' is not verified for one-pass scoring"
    assert_same_scores_and_gradients(model, verbalizer, expect=f"per class ({reason})")
    with pytest.raises(IncompatibleModelError, match="not verified"):
        verbalizer.scores_one_pass(model, verbalizer.encode(ROWS))


def test_gradient_checkpointing_while_training_is_scored_per_class():
    """The frozen model keeps no cache under gradient checkpointing in training."""
    model, verbalizer = prompted("llama", "prefix-tuning", packing=True)
    model.activation_checkpointing_enable()
    model.train()
    reason = one_pass_unsupported_reason(model)
    assert "gradient checkpointing" in reason
    assert_same_scores_and_gradients(model, verbalizer, expect=f"per class ({reason})")
    with torch.no_grad():  # nothing to replay without gradients: one pass again
        assert one_pass_unsupported_reason(model) is None


def test_unverified_method_classes_and_partitioned_weights_are_scored_per_class():
    from pstar_plugins.methods.prompt_tuning.module import PromptTuning

    model, verbalizer = prompted("llama", "prompt-tuning", packing=False)
    assert one_pass_unsupported_reason(model) is None
    original = type(model.method)

    class Reweighted(PromptTuning):  # a subclass could change what the continuation's tokens see
        pass

    model.method.__class__ = Reweighted
    try:
        assert one_pass_unsupported_reason(model) == "method Reweighted does not declare one_pass_continuations"
    finally:
        model.method.__class__ = original
    weight = next(model.base_model.parameters())
    weight.ds_id = 0  # how ZeRO-3 marks a partitioned parameter
    try:
        assert one_pass_unsupported_reason(model) == "ZeRO-3 partitioned weights"
    finally:
        del weight.ds_id
    head, _ = prompted("llama", "p-tuning-v2", packing=False, head="sequence-classification", num_labels=3)
    assert "classification head" in one_pass_unsupported_reason(head)


def test_continuations_cost_one_call_of_the_frozen_model():
    """One call for the input and one for every class's continuation, whatever the number of classes."""
    model, verbalizer = prompted("llama", "prompt-tuning", packing=False)
    calls = []
    handle = model.base_model.register_forward_pre_hook(lambda module, args: calls.append(1))
    try:
        with torch.no_grad():
            verbalizer.scores(model, verbalizer.encode(ROWS))
        assert len(calls) == 2
        calls.clear()
        with torch.no_grad():
            verbalizer.scores_per_class(model, verbalizer.encode(ROWS))
        assert len(calls) == len(WORDS)
    finally:
        handle.remove()


def test_masked_lms_keep_their_one_pass_answer_slot():
    model = tiny_model("bert")
    verbalizer = Verbalizer(TOKENIZER, Template.parse(TEMPLATE), WORDS, masked_lm=True)
    batch = verbalizer.encode(ROWS)
    with torch.no_grad(), recording() as paths:
        assert verbalizer.scores(model, batch).shape == (len(ROWS), len(WORDS))
    assert paths == []  # neither path of the causal LMs
    with pytest.raises(IncompatibleModelError, match="causal LMs"):
        verbalizer.scores_per_class(model, batch)

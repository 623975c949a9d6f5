"""Padding-free calls (``mechanisms.packing``): same outputs and gradients as the padded call, on fewer
positions."""

import contextlib

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from pstar_plugins import build_model
from pstar_plugins.contract.spec import has_classifier_head
from pstar_plugins.mechanisms import fast_paths, pack_plan, packing
from pstar_plugins.mechanisms.template import Template
from pstar_plugins.tasks.generation import target_token_loss, training_batch
from pstar_plugins.testing import tiny_model
from pstar_plugins.testing.conformance.compare import close, close_grads
from tests.helpers import METHOD_OPTIONS
from tests.test_tasks import CharTokenizer

# lengths as uneven as real data: one long row and short ones, so packing has work to save
ROWS = [
    {"mr": "ab", "ref": "xyz"},
    {"mr": "abcdefghij" * 4, "ref": "z"},
    {"mr": "a", "ref": "hello"},
    {"mr": "abcd", "ref": "pq"},
    {"mr": "abcdefg", "ref": "r"},
    {"mr": "", "ref": "st"},
]

METHODS = [
    ("prompt-tuning", {}),
    ("prefix-tuning", {}),
    ("p-tuning", {"template": "{soft:2} D: {mr} {soft} T:{answer}"}),
    ("p-tuning-v2", {"head": "none"}),
]


@st.composite
def masks(draw):
    rows = draw(st.integers(1, 6))
    length = draw(st.integers(1, 12))
    bits = draw(st.lists(st.lists(st.booleans(), min_size=length, max_size=length), min_size=rows, max_size=rows))
    mask = torch.tensor(bits, dtype=torch.long)
    mask[:, -1] = 1  # every row has a token
    return mask


@settings(max_examples=60, deadline=None)
@given(masks())
def test_plan_places_every_real_token_once_in_order_and_never_grows_the_batch(mask):
    p = pack_plan.plan(mask, attention_pair_cost=0.01)
    B, L = mask.shape
    R, C = p.shape
    assert p.tokens == int(mask.sum())
    assert R <= B and p.cost <= pack_plan.cost(B, L, 0.01) + 1e-9  # never dearer than the padded call
    slots = set(zip(p.bin.tolist(), p.offset.tolist()))
    assert len(slots) == p.tokens  # no two tokens share a slot
    for b in range(B):
        mine = p.batch == b
        bins = p.bin[mine].unique()
        assert bins.numel() == 1  # an example is never split across bins
        offsets = p.offset[mine]
        assert (offsets[1:] - offsets[:-1] == 1).all()  # contiguous and in the original order
        assert (p.segment[bins.item(), offsets] == b + 1).all()
    values = torch.randn(B, L, 3)
    back = pack_plan.unpack(p, pack_plan.pack(p, values))
    assert torch.equal(back, values * mask[..., None])


def test_block_mask_keeps_examples_apart_and_causal():
    mask = torch.tensor([[0, 1, 1], [1, 1, 1], [0, 0, 1]])
    p = pack_plan.plan(mask)
    allowed = pack_plan.block_mask(p, torch.float32, boolean=True)[:, 0]
    for r in range(p.shape[0]):
        seg = p.segment[r]
        for q in range(p.shape[1]):
            for k in range(p.shape[1]):
                expected = (k == q) or (k < q and seg[q] == seg[k] and seg[k] != 0)
                assert bool(allowed[r, q, k]) == expected
    additive = pack_plan.block_mask(p, torch.float32, boolean=False)[:, 0]
    assert torch.equal(additive == 0, allowed)


def _generation_batch(method, options):
    tok = CharTokenizer()
    tok.eos_token_id = 2
    template = Template.parse(options.get("template", "D: {mr} T:{answer}"))
    return training_batch(template, tok, ROWS, "ref", 64)


def _model(arch, method, options, attn="sdpa"):
    torch.manual_seed(0)
    base = tiny_model(arch, attn_implementation=attn)
    return build_model(base, method, **{**METHOD_OPTIONS[method], **options})


def _columns_of_padded_call(model, inputs, extra) -> int:
    """Columns of the frozen model's padded call on ``inputs`` (the method's virtual tokens included)."""
    columns = []
    hook = model.base_model.base_model.register_forward_hook(
        lambda m, i, o: columns.append(o.last_hidden_state.shape[1])
    )
    packing, model.packing = model.packing, False
    try:
        with torch.no_grad():
            model(**inputs, **extra)
    finally:
        hook.remove()
        model.packing = packing
    return columns[0]


@contextlib.contextmanager
def _positions_run(model):
    """Positions (rows × columns) of each call of the transformer under the LM head."""
    seen = []
    backbone = model.base_model.base_model
    hook = backbone.register_forward_hook(lambda m, i, o: seen.append(o.last_hidden_state.shape[:2].numel()))
    try:
        yield seen
    finally:
        hook.remove()


def _loss_and_grads(model, fn):
    model.zero_grad(set_to_none=True)
    loss = fn()
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def _assert_same(padded, packed):
    """The conformance suite's comparisons (values and every trainable tensor's gradient)."""
    close(packed[0], padded[0], "packed vs padded loss")
    close_grads(packed[1], padded[1], "packed vs padded")


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize("method,options", METHODS)
def test_packed_target_loss_equals_padded_in_value_and_gradients(arch, method, options):
    """Left-padded prompts with right-padded targets: the generation training batch."""
    model = _model(arch, method, options)
    batch = _generation_batch(method, options)
    padded = _loss_and_grads(model, lambda: target_token_loss(model, batch))
    model.packing = True
    with _positions_run(model) as seen:
        packed = _loss_and_grads(model, lambda: target_token_loss(model, batch))
    _assert_same(padded, packed)
    B, L = batch["attention_mask"].shape
    assert len(seen) == 1 and seen[0] < B * L  # the frozen model ran on fewer positions


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize(
    "method,options", METHODS + [("p-tuning-v2", {"head": "sequence-classification", "num_labels": 2})]
)
def test_packed_last_position_scores_equal_padded(arch, attn, method, options):
    """Classification: left-padded rows, logits (or the head) at the last position only."""
    model = _model(arch, method, options, attn)
    batch = _generation_batch(method, options)
    width = int((batch["labels"] != -100).any(0).nonzero()[0])  # prompts end here, left-padded
    inputs = {k: v[:, :width] for k, v in batch.items() if k != "labels"}
    weights = torch.randn(inputs["attention_mask"].shape[0], 1000)

    def score():
        if has_classifier_head(model.method_config):
            return (model(**inputs).logits * weights[:, :2]).sum()
        logits = model(**inputs, logits_to_keep=1).logits[:, -1]
        return (logits * weights[:, : logits.shape[-1]]).sum()

    padded = _loss_and_grads(model, score)
    model.packing = True
    with _positions_run(model) as seen:
        _assert_same(padded, _loss_and_grads(model, score))
    B, L = inputs["attention_mask"].shape
    assert len(seen) == 1 and seen[0] < B * L


def test_packed_call_with_gradient_checkpointing_matches():
    model = _model("llama", "prefix-tuning", {})
    batch = _generation_batch("prefix-tuning", {})
    padded = _loss_and_grads(model, lambda: target_token_loss(model, batch))
    model.train()
    model.activation_checkpointing_enable()
    model.packing = True
    _assert_same(padded, _loss_and_grads(model, lambda: target_token_loss(model, batch)))


def test_calls_that_cannot_be_packed_run_padded_and_say_why():
    model = _model("llama", "prompt-tuning", {})
    base = model.base_model
    mask = torch.tensor([[0, 1, 1], [1, 1, 1]])
    ids = torch.tensor([[0, 5, 6], [7, 8, 9]])
    pos = torch.tensor([[0, 0, 1], [0, 1, 2]])
    ok = {"input_ids": ids, "attention_mask": mask, "position_ids": pos, "logits_to_keep": 1}
    assert packing.unsupported_reason(base, ok, causal_lm=True) is None
    # a batch without padding is packed too: the decision never depends on the data (ZeRO-3 ranks must agree)
    assert packing.unsupported_reason(base, {**ok, "attention_mask": torch.ones_like(mask)}, True) is None
    assert "labels" in packing.unsupported_reason(base, {**ok, "labels": ids}, True)
    assert "logits_to_keep" in packing.unsupported_reason(base, {**ok, "logits_to_keep": 0}, True)
    assert "cache is passed in" in packing.unsupported_reason(base, {**ok, "past_key_values": object()}, True)
    assert packing.unsupported_reason(base, {**ok, "use_cache": True}, True) is None  # it returns its cache
    model.packing = True
    with_labels = model(input_ids=ids, attention_mask=mask, labels=ids)
    model.packing = False
    assert torch.equal(with_labels.logits, model(input_ids=ids, attention_mask=mask, labels=ids).logits)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize(
    "method,options",
    [
        ("prefix-tuning", {}),
        ("prefix-tuning", {"projection": True}),
        ("p-tuning-v2", {"head": "none"}),
        ("p-tuning-v2", {"head": "sequence-classification", "num_labels": 2}),
    ],
)
def test_packed_mixed_task_batch_equals_padded(arch, method, options):
    """Per-example prefixes: packed rows hold examples of different tasks side by side, and each
    must see only its own task's prefix (a leak would change both values and gradients)."""
    model = _model(arch, method, {**options, "num_tasks": 3})
    with torch.no_grad():  # tasks that differ, so a wrong prefix would show
        for p in model.method.parameters():
            p.add_(torch.randn_like(p) * 0.5)
    batch = _generation_batch(method, options)
    width = int((batch["labels"] != -100).any(0).nonzero()[0])
    inputs = {k: v[:, :width] for k, v in batch.items() if k != "labels"}
    B = inputs["attention_mask"].shape[0]
    task_ids = torch.tensor([2, 0, 2, 1, 0, 2])[:B]
    head = options.get("head", "none") != "none"

    def scores(rows=slice(None)):
        picked = {k: v[rows] for k, v in inputs.items()}
        if head:
            return model(**picked, task_ids=task_ids[rows]).logits
        return model(**picked, task_ids=task_ids[rows], logits_to_keep=1).logits[:, -1]

    weights = torch.randn(B, 1000)

    def score():
        out = scores()
        return (out * weights[:, : out.shape[-1]]).sum()

    padded = _loss_and_grads(model, score)
    with torch.no_grad():  # each row alone, with its own task's prefix: the reference for both
        alone = torch.cat([scores(slice(i, i + 1)) for i in range(B)])
        assert torch.allclose(scores(), alone, atol=1e-4)
    model.packing = True
    with _positions_run(model) as seen:
        packed = _loss_and_grads(model, score)
    _assert_same(padded, packed)
    assert len(seen) == 1 and seen[0] < B * inputs["attention_mask"].shape[1]


def test_packed_mixed_task_training_with_checkpointing_matches():
    model = _model("llama", "p-tuning-v2", {"head": "none", "num_tasks": 2})
    with torch.no_grad():
        for p in model.method.parameters():
            p.add_(torch.randn_like(p) * 0.5)
    batch = _generation_batch("p-tuning-v2", {})
    task_ids = torch.arange(batch["input_ids"].shape[0]) % 2
    loss = lambda: target_token_loss(model, {**batch, "task_ids": task_ids})  # noqa: E731
    padded = _loss_and_grads(model, loss)
    model.train()
    model.activation_checkpointing_enable()
    model.packing = True
    _assert_same(padded, _loss_and_grads(model, loss))


def _left_padded_prompts(batch):
    """The prompts of the generation batch (left-padded to their longest)."""
    width = int((batch["labels"] != -100).any(0).nonzero()[0])
    return {k: v[:, :width] for k, v in batch.items() if k != "labels"}


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize(
    "method,options", METHODS + [("prefix-tuning", {"num_tasks": 3}), ("p-tuning-v2", {"head": "none", "num_tasks": 3})]
)
def test_generate_with_packed_prefill_equals_padded_generate(arch, method, options):
    """The prompt's cache computed padding-free, then generate() on the last column only: the
    same greedy tokens as the padded prefill, from a first call on fewer positions."""
    model = _model(arch, method, options).eval()
    with torch.no_grad():
        for p in model.base_model.parameters():  # attention far from uniform: a misplaced key shows
            p.mul_(4)
        for p in model.method.parameters():
            p.add_(torch.randn_like(p) * 0.5)
    prompts = _left_padded_prompts(_generation_batch(method, options))
    B, L = prompts["attention_mask"].shape
    extra = {"task_ids": torch.arange(B) % 3} if "num_tasks" in options else {}
    kwargs = dict(max_new_tokens=6, do_sample=False, pad_token_id=0, eos_token_id=None, **extra)
    with torch.no_grad():
        padded = model.generate(**prompts, **kwargs)
        model.packing = True
        with _positions_run(model) as seen:
            packed = model.generate(**prompts, **kwargs)
    assert torch.equal(packed, padded), (packed, padded)
    # prefill packed (with prompt tuning's virtual tokens: more columns, fewer real positions),
    # then generate() runs the last prompt column alone
    columns = _columns_of_padded_call(model, prompts, extra)  # the prompts' and any virtual tokens'
    assert seen[0] < B * (columns - 1) and seen[1] == B


def test_generate_that_cannot_use_a_packed_prefill_says_why():
    model = _model("llama", "prefix-tuning", {}).eval()
    base = model.base_model
    inputs = {"input_ids": torch.tensor([[0, 5, 6]]), "attention_mask": torch.tensor([[0, 1, 1]])}
    assert packing.prefill_unsupported_reason(base, inputs, {}) is None
    assert "num_beams" in packing.prefill_unsupported_reason(base, inputs, {"num_beams": 2})
    assert "cache" in packing.prefill_unsupported_reason(base, inputs, {"cache": object()})
    assert "use_cache" in packing.prefill_unsupported_reason(base, inputs, {"use_cache": False})
    # no padding before the last column: the packed prefill would only add a call
    assert "padding" in packing.prefill_unsupported_reason(
        base, {**inputs, "attention_mask": torch.tensor([[1, 1, 0]])}, {}
    )
    model.packing = True
    with torch.no_grad():  # beam search runs the padded prefill and still works
        out = model.generate(**inputs, max_new_tokens=3, num_beams=2, do_sample=False, pad_token_id=0)
    assert out.shape == (1, 6)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_prefill_cache_equals_the_padded_forward_cache_at_real_positions(arch):
    from pstar_plugins.mechanisms.inputs import positions_from_mask

    base = tiny_model(arch)
    with torch.no_grad():  # weights large enough that attention is far from uniform
        for p in base.parameters():
            p.mul_(4)
    prompts = _left_padded_prompts(_generation_batch("prefix-tuning", {}))
    ids, mask = prompts["input_ids"], prompts["attention_mask"]
    cache = packing.prefill(base, {"input_ids": ids, "attention_mask": mask})
    head = mask[:, :-1]
    with torch.no_grad():
        out = base(input_ids=ids[:, :-1], attention_mask=head, position_ids=positions_from_mask(head), use_cache=True)
    reference = getattr(out, "cache", None) or out.past_key_values
    real = head.bool()
    assert len(cache.layers) == len(reference.layers)
    for mine, theirs in zip(cache.layers, reference.layers):
        for x, y in ((mine.keys, theirs.keys), (mine.values, theirs.values)):
            assert x.shape == y.shape
            torch.testing.assert_close(x.transpose(1, 2)[real], y.transpose(1, 2)[real], rtol=1e-4, atol=1e-5)
            assert not x.transpose(1, 2)[~real].any()  # padding holds zeros (masked in every later call)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize("num_tasks", [1, 3])
def test_prompt_tuning_served_from_the_prompts_cache_equals_virtual_tokens(arch, num_tasks):
    """Inference with packing on: each distinct prompt runs once and the user's tokens attend to
    its keys/values; the logits equal those of [P; E] with the virtual tokens in every row."""
    model = _model(arch, "prompt-tuning", {"num_tasks": num_tasks}).eval()
    with torch.no_grad():
        for p in model.base_model.parameters():
            p.mul_(4)
        model.method.prompt.add_(torch.randn_like(model.method.prompt))
    prompts = _left_padded_prompts(_generation_batch("prompt-tuning", {}))
    B, L = prompts["attention_mask"].shape
    extra = {"task_ids": torch.tensor([2, 0, 2, 1, 0, 2])[:B]} if num_tasks > 1 else {}
    m = model.method.config.num_virtual_tokens
    with torch.no_grad():
        full = model(**prompts, **extra).logits
        last = model(**prompts, **extra, logits_to_keep=1).logits
        model.packing = True
        model.method._injector(model.base_model)  # routed once (a two-token probe call), not per call
        with _positions_run(model) as seen, packing.recording() as paths:
            served_last = model(**prompts, **extra, logits_to_keep=1).logits
        served_full = model(**prompts, **extra).logits
    assert paths[0] == "prompt cache: served", paths  # what the matrix reads as the path a cell took
    real = prompts["attention_mask"].bool()
    torch.testing.assert_close(served_full[real], full[real], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(served_last, last, rtol=1e-4, atol=1e-4)
    distinct = len(set(extra["task_ids"].tolist())) if extra else 1
    assert seen == [distinct * m, seen[1]] and seen[1] < B * L  # the prompts once, then the packed user tokens
    with torch.no_grad():  # the model's own loss over [P; E] counts the prompt's prediction of
        with _positions_run(model) as seen:  # a left-padded row's first token: virtual tokens kept
            loss = model(**prompts, **extra, labels=prompts["input_ids"]).loss
        model.packing = False
        reference = model(**prompts, **extra, labels=prompts["input_ids"]).loss
    assert seen == [B * (L + m)]
    assert torch.allclose(loss, reference, atol=1e-6)


def test_adapter_saved_after_serving_from_the_prompts_cache_loads_onto_a_fresh_model(tmp_path):
    """Serving attaches an attention router to the model; the adapter must not record it (a
    prompt-tuning adapter names no attention sites)."""
    from pstar_plugins import load_adapter

    model = _model("llama", "prompt-tuning", {}).eval()
    model.packing = True
    prompts = _left_padded_prompts(_generation_batch("prompt-tuning", {}))
    with torch.no_grad():
        before = model(**prompts, logits_to_keep=1).logits
    model.save_adapter(tmp_path)
    loaded = load_adapter(tiny_model("llama"), tmp_path).eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(**prompts, logits_to_keep=1).logits, before, rtol=1e-4, atol=1e-5)


def _causal_families() -> list[str]:
    from pstar_plugins.testing.architectures import ARCHITECTURES, KIND

    return [a for a in ARCHITECTURES if KIND[a] == "causal-lm"]


@pytest.mark.parametrize("arch", _causal_families())
def test_a_packed_call_that_keeps_its_cache_equals_the_padded_call(arch):
    """``use_cache=True``: the packed call's logits and its cache (in the padded layout) equal the
    padded call's at every real position, and one more token run from either cache gives the same
    logits, on every family that packs; the others run padded and say why."""
    from pstar_plugins.mechanisms.inputs import positions_from_mask
    from pstar_plugins.testing.architectures import tiny_model as family_model

    base = family_model(arch)
    with torch.no_grad():  # weights large enough that attention is far from uniform
        for p in base.parameters():
            p.mul_(2)
    g = torch.Generator().manual_seed(0)
    mask = torch.tensor([[0, 0, 0, 1, 1], [1, 1, 1, 1, 1], [0, 0, 1, 1, 1]])
    ids = torch.randint(3, base.config.vocab_size, mask.shape, generator=g) * mask
    inputs = {
        "input_ids": ids,
        "attention_mask": mask,
        "position_ids": positions_from_mask(mask),
        "use_cache": True,
        "logits_to_keep": 1,
    }
    expected = packing.unsupported_reason(base, inputs, causal_lm=True)
    with torch.no_grad():
        with packing.recording() as calls:
            mine = packing.call(base, dict(inputs), packing=True)
        theirs = base(**inputs)
    if fast_paths.family_reason(base) is not None or fast_paths.has_sliding_layers(base.config):
        assert expected is not None and calls == [f"call: padded ({expected})"]
        return
    assert expected is None and calls == ["call: packed"]
    torch.testing.assert_close(mine.logits, theirs.logits, rtol=1e-4, atol=1e-5)
    real = mask.bool()
    for a, b in zip(mine.cache.layers, theirs.cache.layers):
        for x, y in ((a.keys, b.keys), (a.values, b.values)):
            assert x.shape == y.shape
            torch.testing.assert_close(x.transpose(1, 2)[real], y.transpose(1, 2)[real], rtol=1e-4, atol=1e-5)
    step = torch.randint(3, base.config.vocab_size, (3, 1), generator=g)
    follow = {
        "input_ids": step,
        "attention_mask": torch.cat([mask, torch.ones_like(step)], 1),
        "position_ids": inputs["position_ids"][:, -1:] + 1,
        "use_cache": True,
    }
    with torch.no_grad():
        name = packing._cache_argument(base)  # "cache" since transformers 5.x renamed past_key_values
        after_mine = base(**follow, **{name: mine.cache}).logits
        after_theirs = base(**follow, **{name: theirs.cache}).logits
    torch.testing.assert_close(after_mine, after_theirs, rtol=1e-4, atol=1e-5)

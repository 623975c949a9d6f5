"""Padding-free calls (``core.packing``): same outputs and gradients as the padded call, on fewer
positions."""

import contextlib

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from pstar_plugins import build_model
from pstar_plugins.core import packing
from pstar_plugins.tasks.generation import target_token_loss, training_batch
from pstar_plugins.tasks.template import Template
from pstar_plugins.testing import tiny_model
from tests.helpers import METHOD_OPTIONS
from tests.test_tasks import CharTokenizer

# lengths as uneven as real data: one long row and short ones, so packing has work to save
ROWS = [{"mr": "ab", "ref": "xyz"}, {"mr": "abcdefghij" * 4, "ref": "z"}, {"mr": "a", "ref": "hello"},
        {"mr": "abcd", "ref": "pq"}, {"mr": "abcdefg", "ref": "r"}, {"mr": "", "ref": "st"}]

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
    p = packing.plan(mask, attention_pair_cost=0.01)
    B, L = mask.shape
    R, C = p.shape
    assert p.tokens == int(mask.sum())
    assert R <= B and p.cost <= packing.cost(B, L, 0.01) + 1e-9  # never dearer than the padded call
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
    back = packing.unpack(p, packing.pack(p, values))
    assert torch.equal(back, values * mask[..., None])


def test_block_mask_keeps_examples_apart_and_causal():
    mask = torch.tensor([[0, 1, 1], [1, 1, 1], [0, 0, 1]])
    p = packing.plan(mask)
    allowed = packing.block_mask(p, torch.float32, boolean=True)[:, 0]
    for r in range(p.shape[0]):
        seg = p.segment[r]
        for q in range(p.shape[1]):
            for k in range(p.shape[1]):
                expected = (k == q) or (k < q and seg[q] == seg[k] and seg[k] != 0)
                assert bool(allowed[r, q, k]) == expected
    additive = packing.block_mask(p, torch.float32, boolean=False)[:, 0]
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
    model.zero_grad()
    loss = fn()
    loss.backward()
    return loss.detach(), [p.grad.clone() for p in model.parameters() if p.requires_grad]


def _assert_same(a, b):
    (loss_a, grads_a), (loss_b, grads_b) = a, b
    assert torch.allclose(loss_a, loss_b, atol=1e-5), (loss_a.item(), loss_b.item())
    for x, y in zip(grads_a, grads_b, strict=True):
        assert torch.allclose(x, y, atol=1e-6, rtol=1e-4), (x - y).abs().max()


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
@pytest.mark.parametrize("method,options", METHODS + [("p-tuning-v2", {"head": "sequence-classification", "num_labels": 2})])
def test_packed_last_position_scores_equal_padded(arch, attn, method, options):
    """Classification: left-padded rows, logits (or the head) at the last position only."""
    model = _model(arch, method, options, attn)
    batch = _generation_batch(method, options)
    width = int((batch["labels"] != -100).any(0).nonzero()[0])  # prompts end here, left-padded
    inputs = {k: v[:, :width] for k, v in batch.items() if k != "labels"}
    weights = torch.randn(inputs["attention_mask"].shape[0], 1000)

    def score():
        if method == "p-tuning-v2" and options["head"] != "none":
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
    model.gradient_checkpointing_enable()
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
    assert "cache" in packing.unsupported_reason(base, {**ok, "use_cache": True}, True)
    model.packing = True
    with_labels = model(input_ids=ids, attention_mask=mask, labels=ids)
    model.packing = False
    assert torch.equal(with_labels.logits, model(input_ids=ids, attention_mask=mask, labels=ids).logits)

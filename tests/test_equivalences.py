"""Outputs equal a reference: padding, folding, label alignment, generation, mixed-task batches.

Where the conformance suite has the check (padded rows equal rows alone, folded equals unfolded,
cached ``generate()`` equals a step-by-step loop, mixed-task rows equal single-task rows), these
tests run that check itself over the (architecture, method) pairs it must hold for: a pair where
the check does not apply fails here instead of being skipped. What the suite does not check (how
labels and position ids are taken, what folding leaves behind) is tested below it.
"""

import pytest
import torch
from torch.nn import functional as F

from pstar_plugins.testing import DECODER_ONLY, random_batch, tiny_model
from pstar_plugins.testing.conformance import (
    Cell,
    Skip,
    check_folded_equals_unfolded,
    check_generate_equals_loop,
    check_mixed_tasks_equal_single,
    check_padded_equals_alone,
)
from tests.helpers import CASES, METHOD_OPTIONS, make, soft_index

#: architectures whose bare model is not invariant to left padding of the encoder (BART's learned
#: absolute positions take no position_ids), so only right padding is required of a method there
LEFT_PADDING_SHIFTS_THE_BARE_MODEL = {"bart"}


def _cell(arch: str, method: str, **options) -> Cell:
    return Cell(lambda: tiny_model(arch), method, {**METHOD_OPTIONS[method], **options})


def _conformance(check, arch: str, method: str, **options) -> str:
    """Run one conformance check on a pair it must hold for: a check that does not apply fails the test."""
    try:
        return check(_cell(arch, method, **options))
    except Skip as exc:
        pytest.fail(f"{check.__name__} does not apply to {method} on {arch}: {exc}")


@pytest.mark.parametrize("arch,method", CASES)
def test_padded_batch_equals_each_example_alone(arch, method):
    detail = _conformance(check_padded_equals_alone, arch, method)
    excused = {side for side in ("left", "right") if f"{side} padding not required" in detail}
    allowed = {"left"} if arch in LEFT_PADDING_SHIFTS_THE_BARE_MODEL else set()
    assert excused <= allowed, f"{method} on {arch} was excused {sorted(excused)} padding: {detail}"


FOLD_CASES = [(a, "prefix-tuning") for a in ("llama", "gpt2", "bert", "t5", "bart")] + [("llama", "p-tuning")]


@pytest.mark.parametrize("arch,method", FOLD_CASES)
def test_folded_equals_reparameterised(arch, method):
    _conformance(check_folded_equals_unfolded, arch, method)


def _layers_with_weights(method) -> list[str]:
    """The method's torch layers (Linear, LSTM, Embedding, ...) that hold weights of their own."""
    return [
        name
        for name, module in method.named_modules()
        if type(module).__module__.startswith("torch.") and any(True for _ in module.parameters(recurse=False))
    ]


@pytest.mark.parametrize("arch,method", FOLD_CASES)
def test_folding_leaves_only_static_tensors_the_model_reads(arch, method):
    """``fold()`` replaces the reparameterisation by the tensors it computed: no layer that computed
    them is left, and every tensor left reaches the outputs (none is a leftover input of the network)."""
    cell = _cell(arch, method)
    model = cell.build()
    assert _layers_with_weights(model.method), "nothing computes the prompt before folding"
    model.fold()
    assert model.method.folded
    assert not _layers_with_weights(model.method), _layers_with_weights(model.method)
    left = dict(model.method.named_parameters())
    assert left
    batch = cell.batch(model)
    loss = cell.loss(cell.real_outputs(cell.forward(model, batch), batch))
    grads = torch.autograd.grad(loss, list(left.values()), allow_unused=True)
    unread = [n for (n, _), g in zip(left.items(), grads) if g is None or not bool(g.abs().sum() > 0)]
    assert not unread, f"tensors left by fold() that no output depends on: {unread}"


@pytest.mark.parametrize("arch", DECODER_ONLY)
@pytest.mark.parametrize("options", [{}, {"position": "after_bos"}])
def test_prompt_tuning_loss_ignores_virtual_positions(arch, options):
    model = make(arch, "prompt-tuning", **options).eval()
    ids = random_batch(2, 8)
    labels = ids.clone()
    labels[0, :3] = -100
    with torch.no_grad():
        out = model(input_ids=ids, labels=labels)
    assert out.logits.shape[:2] == ids.shape  # aligned with the user's tokens
    # logits[j] predicts user token j+1 (after BOS that prediction comes from the last virtual token)
    shifted_logits = out.logits[:, :-1]
    manual = F.cross_entropy(
        shifted_logits.reshape(-1, out.logits.shape[-1]), labels[:, 1:].reshape(-1), ignore_index=-100
    )
    torch.testing.assert_close(out.loss, manual, rtol=1e-5, atol=1e-6)


def test_p_tuning_labels_at_soft_positions_never_enter_the_loss():
    model = make("llama", "p-tuning").eval()
    ids = random_batch(2, 9)
    index = soft_index(2, 9)
    labels = ids.clone()
    garbage = labels.clone()
    garbage[index >= 0] = 5  # whatever sits at soft positions must not matter
    with torch.no_grad():
        a = model(input_ids=ids, prompt_index=index, labels=labels)
        b = model(input_ids=ids, prompt_index=index, labels=garbage)
        masked = labels.masked_fill(index >= 0, -100)
        manual = F.cross_entropy(a.logits[:, :-1].reshape(-1, a.logits.shape[-1]), masked[:, 1:].reshape(-1))
    assert a.logits.shape[:2] == ids.shape
    torch.testing.assert_close(a.loss, b.loss)
    torch.testing.assert_close(a.loss, manual, rtol=1e-5, atol=1e-6)


#: (architecture, method, options): P-tuning v2 generates with the LM head, not a classification head
GENERATE_CASES = (
    [(a, m, {}) for a in DECODER_ONLY for m in ("prompt-tuning", "prefix-tuning", "p-tuning")]
    + [("llama", "p-tuning-v2", {"head": "none"})]
    + [(a, m, {}) for a in ("t5", "bart") for m in ("prompt-tuning", "prefix-tuning")]
)


@pytest.mark.parametrize("arch,method,options", GENERATE_CASES, ids=[f"{a}-{m}" for a, m, _ in GENERATE_CASES])
def test_generate_with_cache_equals_step_by_step_loop(arch, method, options):
    _conformance(check_generate_equals_loop, arch, method, **options)


@pytest.mark.parametrize("method", ["prompt-tuning", "prefix-tuning"])
@pytest.mark.parametrize("arch", ["llama", "gpt2", "bert", "t5"])
def test_mixed_task_batch_equals_single_task_forwards(arch, method):
    _conformance(check_mixed_tasks_equal_single, arch, method)


def test_user_position_ids_are_respected():
    model = make("llama", "prompt-tuning").eval()
    ids = random_batch(1, 6)
    with torch.no_grad():
        default = model(input_ids=ids).logits
        explicit = model(input_ids=ids, position_ids=torch.arange(6)[None]).logits
        # RoPE is relative: only a non-uniform change of positions changes the output
        shifted = model(input_ids=ids, position_ids=torch.tensor([[0, 1, 2, 10, 11, 12]])).logits
    torch.testing.assert_close(default, explicit)
    assert not torch.allclose(default, shifted)

"""Outputs equal a reference: padding, folding, label alignment, generation, mixed-task batches."""

import pytest
import torch
from torch.nn import functional as F

from pstar_plugins.testing import DECODER_ONLY, ENCODER_DECODER, random_batch
from tests.helpers import CASES, make, pad_rows, soft_index

# BART's learned absolute positions shift under left padding of the encoder even without any
# method (it takes no position_ids), so left padding is only meaningful for the others.
PADDING_CASES = [(a, m, side) for a, m in CASES for side in ("left", "right") if not (a == "bart" and side == "left")]


def _example(arch, method, length, seed):
    ids = random_batch(1, length, seed=seed)
    row = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    if method == "p-tuning":
        row["prompt_index"] = soft_index(1, length)
    if arch in ENCODER_DECODER:
        row["decoder_input_ids"] = random_batch(1, 4, seed=seed + 7)
    return row


def _real_logits(logits, row_mask, method, arch):
    if method == "p-tuning-v2" or arch in ENCODER_DECODER:
        return logits  # (C,) per row, or decoder logits (unpadded)
    return logits[row_mask.bool()]


@pytest.mark.parametrize("arch,method,side", PADDING_CASES)
def test_padded_batch_equals_each_example_alone(arch, method, side):
    model = make(arch, method).eval()
    rows = [_example(arch, method, n, seed) for seed, n in enumerate((9, 12, 10))]
    if arch in ENCODER_DECODER:
        pad = model.base_model.config.pad_token_id
    else:
        pad = 0
    batch = pad_rows(rows, side, pad_id=pad)
    with torch.no_grad():
        together = model(**batch)
        for i, row in enumerate(rows):
            alone = model(**row)
            expected = _real_logits(alone.logits[0], row["attention_mask"][0], method, arch)
            got = _real_logits(together.logits[i], batch["attention_mask"][i], method, arch)
            torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("arch", ["llama", "gpt2", "bert", "t5", "bart"])
def test_folded_prefix_equals_reparameterised(arch):
    model = make(arch, "prefix-tuning").eval()
    batch = {"input_ids": random_batch(2, 7), "attention_mask": torch.ones(2, 7, dtype=torch.long)}
    if arch in ENCODER_DECODER:
        batch["decoder_input_ids"] = random_batch(2, 4, seed=3)
    with torch.no_grad():
        before = model(**batch).logits
        assert not model.method.folded
        model.fold()
        after = model(**batch).logits
    assert model.method.folded
    names = [n for n, _ in model.method.named_parameters()]
    assert names and all(".mlp." not in n and "embedding" not in n for n in names), names
    assert (before - after).abs().max() <= 1e-5


def test_folded_p_tuning_encoder_equals_unfolded():
    model = make("llama", "p-tuning").eval()
    batch = {"input_ids": random_batch(2, 9), "prompt_index": soft_index(2, 9)}
    with torch.no_grad():
        before = model(**batch).logits
        model.fold()
        after = model(**batch).logits
    assert [n for n, _ in model.method.named_parameters()] == ["encoder.embedding"]
    assert (before - after).abs().max() <= 1e-5


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
    manual = F.cross_entropy(shifted_logits.reshape(-1, out.logits.shape[-1]), labels[:, 1:].reshape(-1), ignore_index=-100)
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


def _greedy_reference(model, batch, steps, arch):
    """Step-by-step greedy decoding with full forwards and no cache."""
    if arch in ENCODER_DECODER:
        start = model.base_model.config.decoder_start_token_id
        dec = torch.full((batch["input_ids"].shape[0], 1), start)
        for _ in range(steps):
            logits = model(**batch, decoder_input_ids=dec).logits
            dec = torch.cat([dec, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
        return dec
    ids, extra = batch["input_ids"], {k: v for k, v in batch.items() if k != "input_ids"}
    for _ in range(steps):
        mask = torch.ones_like(ids)
        if "prompt_index" in extra:
            extra["prompt_index"] = torch.cat([extra["prompt_index"], torch.full((ids.shape[0], ids.shape[1] - extra["prompt_index"].shape[1]), -1)], 1)
        logits = model(input_ids=ids, attention_mask=mask, **{k: v for k, v in extra.items() if k != "attention_mask"}).logits
        ids = torch.cat([ids, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    return ids


GENERATE_CASES = [(a, m) for a in DECODER_ONLY for m in ("prompt-tuning", "prefix-tuning", "p-tuning")] + [
    ("llama", "p-tuning-v2"), ("t5", "prompt-tuning"), ("t5", "prefix-tuning"), ("bart", "prompt-tuning"), ("bart", "prefix-tuning")]


@pytest.mark.parametrize("arch,method", GENERATE_CASES)
def test_generate_with_cache_equals_step_by_step_loop(arch, method):
    options = {"head": "none"} if method == "p-tuning-v2" else {}
    model = make(arch, method, **options).eval()
    batch = {"input_ids": random_batch(2, 9, seed=4)}
    if method == "p-tuning":
        batch["prompt_index"] = soft_index(2, 9)
    steps = 6
    with torch.no_grad():
        expected = _greedy_reference(model, dict(batch), steps, arch)
        kwargs = dict(max_new_tokens=steps, do_sample=False, use_cache=True, pad_token_id=0)
        if arch in ENCODER_DECODER:
            kwargs["min_new_tokens"] = steps
            kwargs["eos_token_id"] = None
        got = model.generate(**batch, attention_mask=torch.ones_like(batch["input_ids"]), **kwargs)
    assert torch.equal(got[:, : expected.shape[1]], expected), (got, expected)


@pytest.mark.parametrize("method", ["prompt-tuning", "prefix-tuning"])
@pytest.mark.parametrize("arch", ["llama", "gpt2", "bert", "t5"])
def test_mixed_task_batch_equals_single_task_forwards(arch, method):
    model = make(arch, method, num_tasks=3).eval()
    with torch.no_grad():  # give every task its own, different prompt
        for p in model.method.parameters():
            p.add_(torch.randn_like(p) * 0.5)
    ids = random_batch(4, 8)
    task_ids = torch.tensor([2, 0, 1, 2])
    extra = {"decoder_input_ids": random_batch(4, 3, seed=2)} if arch in ENCODER_DECODER else {}
    with torch.no_grad():
        mixed = model(input_ids=ids, task_ids=task_ids, **extra).logits
        for t in range(3):
            rows = (task_ids == t).nonzero().flatten()
            single = model(input_ids=ids[rows], task_ids=torch.full((len(rows),), t),
                           **{k: v[rows] for k, v in extra.items()}).logits
            torch.testing.assert_close(mixed[rows], single, rtol=1e-5, atol=1e-6)
        # and the tasks really differ
        other = model(input_ids=ids, task_ids=torch.zeros(4, dtype=torch.long), **extra).logits
    assert not torch.allclose(mixed[0], other[0])


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

"""The conformance check of one-pass label-word scoring: multi-token label words scored from one
pass over the input and one over every class's continuation equal the per-class loop (values
and the gradients that reach the method's tensors), on every cell whose record allows the path."""

from __future__ import annotations

import torch

from pstar_plugins.mechanisms.template import TEMPLATE_SLOTS
from pstar_plugins.testing.conformance.cell import CAUSAL, Cell, Skip
from pstar_plugins.testing.conformance.compare import close, close_grads, with_packing


def _label_words(cell: Cell) -> list[list[int]]:
    """Three classes: words of one, two and three tokens, the longer ones sharing a first token
    (so that the continuation, not the first token, tells them apart)."""
    g = torch.Generator().manual_seed(cell.seed + 7)
    first, second, third, other = (int(t) for t in torch.randint(cell.low, cell.vocab, (4,), generator=g))
    return [[other], [first, second], [first, third, second]]


def check_one_pass_scoring(cell: Cell) -> str:
    from pstar_plugins.tasks.verbalizer import EncodedBatch, Verbalizer, one_pass_unsupported_reason

    if cell.kind != CAUSAL:
        raise Skip("label words are scored after the input on causal LMs only")
    model = cell.build()
    reason = one_pass_unsupported_reason(model)
    if reason is not None:
        raise Skip(f"scored per class: {reason}")
    inputs = cell.batch(model)
    slot_input = model.method.slot_input
    if slot_input in inputs:  # the scorer extends a template's slots over the appended words
        inputs[TEMPLATE_SLOTS] = inputs.pop(slot_input)
    batch = EncodedBatch(inputs, inputs["attention_mask"].new_zeros(len(inputs["input_ids"])), None)
    scorer = Verbalizer.of_token_ids(_label_words(cell), pad_id=cell.pad)
    model.train()  # a training step's mode (the tiny configs have no dropout)
    for packing in (False, True):
        with with_packing(model, packing):
            one_pass, one_pass_grads = _scores_and_grads(model, scorer.scores_one_pass, batch)
            per_class, per_class_grads = _scores_and_grads(model, scorer.scores_per_class, batch)
        what = "packed" if packing else "padded"
        close(one_pass, per_class, f"one-pass label-word scores vs the per-class loop ({what})")
        assert per_class_grads, "no gradient reached the method's tensors"
        close_grads(one_pass_grads, per_class_grads, f"one-pass label-word gradients vs the per-class loop ({what})")
    return "one pass equals the per-class loop, padded and packed"


def _scores_and_grads(model, score, batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    values = score(model, batch)
    values.sum().backward()
    grads = {name: p.grad.clone() for name, p in model.trainable_named_parameters() if p.grad is not None}
    return values.detach(), grads

"""Comparisons the checks make: tensors close within a tolerance scaled to their size, rows and
gradients likewise, packing switched on or off for one block, and the bare model's own behaviour
(padding invariance, outputs with the method disabled) that a check measures the method against."""

from __future__ import annotations

import contextlib
from typing import Any, Iterator

import torch

from pstar_plugins.testing.conformance.cell import SEQ2SEQ, Cell, Skip


def close(got, expected, what: str, rtol: float = 1e-4, atol: float = 2e-5) -> None:
    """``got`` equals ``expected`` within ``rtol`` and ``atol`` times the larger of 1 and its largest value."""
    got, expected = got.float(), expected.float()
    if got.shape != expected.shape:
        raise AssertionError(f"{what}: shape {tuple(got.shape)} != {tuple(expected.shape)}")
    scale = max(1.0, float(expected.abs().max()) if expected.numel() else 1.0)
    if not torch.allclose(got, expected, rtol=rtol, atol=atol * scale):
        diff = float((got - expected).abs().max())
        raise AssertionError(f"{what}: max abs difference {diff:.3g} (scale {scale:.3g})")


def close_rows(got: list[torch.Tensor], expected: list[torch.Tensor], what: str, **tol) -> None:
    for i, (g, e) in enumerate(zip(got, expected)):
        close(g, e, f"{what}, row {i}", **tol)


def close_grads(got: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], what: str) -> None:
    assert got.keys() == expected.keys(), f"{what}: trainable tensors differ"
    for name in expected:
        close(got[name], expected[name], f"{what}, gradient of {name}", rtol=1e-3, atol=1e-5)


@contextlib.contextmanager
def with_packing(model, on: bool) -> Iterator[None]:
    """``model.packing`` set to ``on`` for the block."""
    previous = model.packing
    model.packing = on
    try:
        yield
    finally:
        model.packing = previous


def disabled_matches_bare(cell: Cell, model, bare, batch: dict[str, Any], what: str) -> str:
    """With the method disabled, ``model`` gives ``bare``'s outputs on ``batch`` (a method with its
    own head: that head over the bare backbone's hidden states)."""
    plain = {k: v for k, v in batch.items() if k in ("input_ids", "attention_mask", "decoder_input_ids")}
    with torch.no_grad():
        with model.disable_adapter():
            out = cell.forward(model, batch)
        if out.logits.dim() == 2:
            method = model.method
            if not (hasattr(method, "pool") and hasattr(method, "head")):
                raise Skip("the method has its own output head and exposes no pool/head to compare")
            hidden = bare.base_model(**plain).last_hidden_state.float()
            close(
                out.logits,
                method.head(method.pool(hidden, batch["attention_mask"])),
                f"{what} (head over the bare backbone)",
            )
            return "head over the bare backbone"
        close_rows(cell.real_outputs(out, batch), cell.real_outputs(cell.forward(bare, plain), plain), what)
    return ""


def labelled(cell: Cell, model, batch: dict[str, Any]) -> dict[str, Any]:
    """``batch`` with labels for the model's output: classes for a head, shifted decoder inputs, or
    the input ids at real positions."""
    with torch.no_grad():
        probe = cell.forward(model, batch)
    out = dict(batch)
    if probe.logits.dim() == 2:
        out["labels"] = torch.arange(batch["input_ids"].shape[0]) % probe.logits.shape[-1]
    elif cell.kind == SEQ2SEQ:
        out["labels"] = torch.roll(batch["decoder_input_ids"], -1, dims=1)
    else:
        out["labels"] = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    return out


def padding_invariant(cell: Cell, model_call, rows, side: str) -> bool | None:
    """Whether ``model_call`` gives each row of a ``side``-padded batch what it gives the row alone."""
    batch = cell.batch(None, rows, side)
    with torch.no_grad():
        together = cell.real_outputs(model_call(batch), batch)
        for i, r in enumerate(rows):
            alone_batch = cell.batch(None, [r], side)
            if "decoder_input_ids" in batch:
                alone_batch["decoder_input_ids"] = batch["decoder_input_ids"][i : i + 1]
            alone = cell.real_outputs(model_call(alone_batch), alone_batch)[0]
            if not torch.allclose(together[i], alone, rtol=1e-4, atol=2e-5 * max(1.0, float(alone.abs().max()))):
                return False
    return True


def fast_path_note(records: list[str]) -> str:
    """How the recorded model calls ran (``mechanisms.packing.recording``)."""
    return "; ".join(sorted(set(records))) if records else "no model call recorded"

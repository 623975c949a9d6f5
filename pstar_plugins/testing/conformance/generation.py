"""The generation check: greedy cached ``generate()`` equals a step-by-step loop without cache."""

from __future__ import annotations

from typing import Any

import torch

from pstar_plugins.contract.errors import PStarError, UnsupportedError
from pstar_plugins.mechanisms import packing as packing_module
from pstar_plugins.testing.conformance.cell import ENCODER, SEQ2SEQ, Cell, Skip
from pstar_plugins.testing.conformance.compare import close, fast_path_note, with_packing


class _ScoreRecorder:
    """A logits processor that keeps the scores ``generate()`` decides each step on."""

    def __init__(self) -> None:
        self.scores: list[torch.Tensor] = []

    def __call__(self, input_ids, scores):
        self.scores.append(scores.detach().float().clone())
        return scores


def _greedy_loop(cell: Cell, model, batch: dict[str, Any], steps: int):
    """Greedy decoding by full recomputation, no cache; returns tokens, each step's logits and
    each step's top-2 margin."""
    margins, logits_seen = [], []
    if cell.kind == SEQ2SEQ:
        start = model.base_model.generation_config.decoder_start_token_id
        start = start if start is not None else model.base_model.config.decoder_start_token_id
        dec = torch.full(
            (batch["input_ids"].shape[0], 1), int(start), dtype=torch.long, device=batch["input_ids"].device
        )
        extra = model.method.example_inputs(batch["input_ids"], batch["attention_mask"])
        for _ in range(steps):
            logits = model(
                input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], decoder_input_ids=dec, **extra
            ).logits[:, -1]
            logits = _no_eos(cell, logits.float())
            logits_seen.append(logits)
            top = logits.topk(2, dim=-1).values
            margins.append(top[:, 0] - top[:, 1])
            dec = torch.cat([dec, logits.argmax(-1, keepdim=True)], 1)
        return dec, logits_seen, torch.stack(margins, 1)
    ids, mask = batch["input_ids"], batch["attention_mask"]
    for _ in range(steps):
        extra = model.method.example_inputs(ids, mask)
        logits = model(input_ids=ids, attention_mask=mask, **extra).logits[:, -1]
        logits = _no_eos(cell, logits.float())
        logits_seen.append(logits)
        top = logits.topk(2, dim=-1).values
        margins.append(top[:, 0] - top[:, 1])
        ids = torch.cat([ids, logits.argmax(-1, keepdim=True)], 1)
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
    return ids, logits_seen, torch.stack(margins, 1)


def _no_eos(cell: Cell, logits: torch.Tensor) -> torch.Tensor:
    eos = cell.eos if isinstance(cell.eos, (list, tuple)) else [cell.eos] if cell.eos is not None else []
    for e in eos:
        logits[:, int(e)] = float("-inf")
    return logits


def check_generate_equals_loop(cell: Cell) -> str:
    if cell.kind == ENCODER:
        raise Skip("an encoder-only model does not generate")
    model = cell.build()
    batch = cell.batch(model, cell.rows((5, 8, 7), seed=3))
    steps = 5
    with torch.no_grad():
        if cell.forward(model, batch).logits.dim() == 2:
            raise Skip("a classification head does not generate")
    from pstar_plugins.mechanisms.inputs import is_encoder_decoder

    with torch.no_grad(), with_packing(model, False):
        try:
            expected, expected_logits, margins = _greedy_loop(cell, model, batch, steps)
        except PStarError as exc:
            raise Skip(f"the method does not generate: {exc}") from exc
    notes = []
    from transformers import LogitsProcessorList

    for on in (False, True):
        recorder = _ScoreRecorder()
        kwargs = dict(
            max_new_tokens=steps,
            min_new_tokens=steps,
            do_sample=False,
            use_cache=True,
            pad_token_id=cell.pad,
            logits_processor=LogitsProcessorList([recorder]),
        )
        extra = {k: v for k, v in batch.items() if k not in ("input_ids", "attention_mask", "decoder_input_ids")}
        with torch.no_grad(), with_packing(model, on), packing_module.recording() as records:
            try:
                got = model.generate(
                    input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], **extra, **kwargs
                )
            except UnsupportedError as exc:
                raise Skip(f"the method does not generate: {exc}") from exc
        got = got[:, : expected.shape[1]]
        # the first step's scores come from the prompt's cache (packed prefill when on): the
        # strongest check, as greedy tokens of a near-uniform random model rarely change
        first, reference = recorder.scores[0], expected_logits[0]
        finite = torch.isfinite(reference)
        if not torch.equal(torch.isfinite(first), finite):
            raise AssertionError(f"packing={on}: generate()'s first-step scores mask other tokens than the loop's")
        close(first[finite], reference[finite], f"packing={on}: generate()'s first-step scores vs the loop's logits")
        if not torch.equal(got, expected):
            offset = 1 if is_encoder_decoder(model.base_model) else batch["input_ids"].shape[1]
            diff = (got != expected).nonzero()
            row, col = int(diff[0, 0]), int(diff[0, 1]) - offset
            if 0 <= col < margins.shape[1] and float(margins[row, col]) < 1e-4:
                notes.append(f"packing={on}: differs after a near tie (margin {float(margins[row, col]):.2g})")
                continue
            raise AssertionError(
                f"packing={on}: generate() != step-by-step loop at row {row}, new token {col}:\n{got}\nvs\n{expected}"
            )
        if on:
            notes.append(fast_path_note(records))
    return "; ".join(notes)

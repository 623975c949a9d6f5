"""The checks of a built model: the method switched off, training, padding, packing, folding,
save/load, gradient checkpointing, mixed tasks, and a second build or refused load."""

from __future__ import annotations

import tempfile

import torch

from pstar_plugins.contract.errors import PStarError
from pstar_plugins.mechanisms import packing as packing_module
from pstar_plugins.testing.conformance.cell import Cell, Skip
from pstar_plugins.testing.conformance.compare import (
    close,
    close_grads,
    close_rows,
    disabled_matches_bare,
    fast_path_note,
    labelled,
    padding_invariant,
    with_packing,
)


def check_disabled_equals_base(cell: Cell) -> str:
    bare = cell.base()
    model = cell.build()
    rows = cell.rows()
    notes = []
    for side in ("right", "left"):
        if side == "left" and not padding_invariant(cell, lambda b: cell.forward(bare, b), rows, side):
            # e.g. GPT-2 numbers left padding as positions; the wrapper gives rows their own positions
            notes.append("left padding not compared: the bare model is not invariant to it")
            continue
        batch = cell.batch(model, rows, side)
        notes.append(disabled_matches_bare(cell, model, bare, batch, f"{side}-padded, disabled method vs bare model"))
    batch = cell.batch(model, rows)
    with torch.no_grad():
        enabled = cell.real_outputs(cell.forward(model, batch), batch)
        with model.disable_adapter():
            disabled = cell.real_outputs(cell.forward(model, batch), batch)
    if all(torch.allclose(a, b) for a, b in zip(enabled, disabled)):
        raise AssertionError("the enabled method changes nothing: its prompt never reaches the model")
    return "; ".join(sorted({n for n in notes if n}))


def check_trains_only_method_tensors(cell: Cell) -> str:
    from pstar_plugins import make_optimizer

    model = cell.build()
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    trainable = {n: p.detach().clone() for n, p in model.trainable_named_parameters()}
    if not trainable:
        raise AssertionError("the method has no trainable tensor")
    batch = labelled(cell, model, cell.batch(model))
    optimizer = make_optimizer(model, 1e-2)
    for step in range(2):
        optimizer.zero_grad()
        out = model(**batch)
        if out.loss is None or not torch.isfinite(out.loss):
            raise AssertionError(f"the call with labels gave loss {out.loss!r}")
        out.loss.backward()
        if step == 0:
            silent = [
                n for n, p in model.trainable_named_parameters() if p.grad is None or not bool(p.grad.abs().sum() > 0)
            ]
            if silent:
                raise AssertionError(f"trainable tensors without gradient: {silent[:5]}")
            leaked = [n for n, p in model.named_parameters() if not p.requires_grad and p.grad is not None]
            if leaked:
                raise AssertionError(f"frozen tensors received a gradient: {leaked[:5]}")
        optimizer.step()
    moved = [n for n, p in model.named_parameters() if not p.requires_grad and not torch.equal(p, frozen[n])]
    if moved:
        raise AssertionError(f"frozen weights changed under training: {moved[:5]}")
    still = [n for n, p in model.trainable_named_parameters() if torch.equal(p, trainable[n])]
    if still:
        raise AssertionError(f"trainable tensors did not change: {still[:5]}")
    return f"{len(trainable)} trainable tensors"


def check_padded_equals_alone(cell: Cell) -> str:
    model = cell.build()
    bare = cell.base()
    rows = cell.rows()
    notes = []
    for side in ("left", "right"):
        batch = cell.batch(model, rows, side)
        try:
            with torch.no_grad():
                together = cell.real_outputs(cell.forward(model, batch), batch)
                for i, r in enumerate(rows):
                    alone_batch = cell.batch(model, [r], side)
                    if "decoder_input_ids" in batch:
                        alone_batch["decoder_input_ids"] = batch["decoder_input_ids"][i : i + 1]
                    alone = cell.real_outputs(cell.forward(model, alone_batch), alone_batch)[0]
                    close(together[i], alone, f"{side}-padded row {i} vs alone")
        except AssertionError:
            if padding_invariant(cell, lambda b: cell.forward(bare, b), rows, side):
                raise
            # e.g. BART's encoder numbers left padding as positions and takes no position_ids
            notes.append(f"{side} padding not required: the bare model itself is not invariant to it")
    if len(notes) == 2:
        raise Skip("; ".join(notes))
    return "; ".join(notes)


def check_packed_equals_padded(cell: Cell) -> str:
    model = cell.build()
    batch = cell.batch(model)
    results = {}
    for on in (False, True):
        model.zero_grad(set_to_none=True)
        with with_packing(model, on), packing_module.recording() as records:
            outputs = cell.real_outputs(cell.forward(model, batch), batch)
        cell.loss(outputs).backward()
        results[on] = ([o.detach() for o in outputs], cell.grads(model), records)
    close_rows(results[True][0], results[False][0], "packed vs padded values")
    close_grads(results[True][1], results[False][1], "packed vs padded")
    return fast_path_note(results[True][2])


def check_inference_fast_path(cell: Cell) -> str:
    model = cell.build()
    batch = cell.batch(model)
    with torch.no_grad():
        with with_packing(model, False):
            plain = cell.real_outputs(cell.forward(model, batch), batch)
            plain_unkept = cell.real_outputs(model(**batch), batch)
        with with_packing(model, True), packing_module.recording() as records:
            fast = cell.real_outputs(cell.forward(model, batch), batch)
            fast_unkept = cell.real_outputs(model(**batch), batch)
    close_rows(fast, plain, "inference with packing vs without")
    close_rows(fast_unkept, plain_unkept, "inference with packing vs without (no logits_to_keep)")
    return fast_path_note(records)


def check_folded_equals_unfolded(cell: Cell) -> str:
    model = cell.build()
    if model.method.folded:
        raise Skip("nothing to fold (no reparameterisation)")
    batch = cell.batch(model)
    with torch.no_grad():
        before = cell.real_outputs(cell.forward(model, batch), batch)
        model.fold()
        after = cell.real_outputs(cell.forward(model, batch), batch)
    if not model.method.folded:
        raise AssertionError("fold() left the method unfolded")
    close_rows(after, before, "folded vs unfolded", atol=5e-5)
    return ""


def check_save_load_roundtrip(cell: Cell) -> str:
    from pstar_plugins import load_adapter, make_optimizer

    model = cell.build()
    batch = labelled(cell, model, cell.batch(model))
    optimizer = make_optimizer(model, 1e-2)
    model(**batch).loss.backward()
    optimizer.step()
    plain = {k: v for k, v in batch.items() if k != "labels"}
    with torch.no_grad():
        expected = cell.real_outputs(cell.forward(model, plain), plain)
    trained = {n: p.detach().clone() for n, p in model.trainable_named_parameters()}
    with tempfile.TemporaryDirectory() as tmp:
        model.save_adapter(tmp)
        loaded = load_adapter(cell.base(), tmp, tokenizer=cell.tokenizer, plugin_manager=cell.plugin_manager)
    loaded.eval()
    got = dict(loaded.trainable_named_parameters())
    missing = sorted(set(trained) - set(got))
    if missing:
        raise AssertionError(f"trainable tensors not restored as trainable by load_adapter: {missing[:5]}")
    differ = [n for n in trained if not torch.equal(got[n].detach(), trained[n])]
    if differ:
        raise AssertionError(f"tensors differ after save/load: {differ[:5]}")
    with torch.no_grad():
        after = cell.real_outputs(cell.forward(loaded, plain), plain)
    close_rows(after, expected, "loaded vs saved model", rtol=1e-6, atol=1e-6)
    return f"{len(trained)} tensors bit-exact"


def check_checkpointed_gradients(cell: Cell) -> str:
    if not cell.supports_checkpointing:
        raise Skip("the base model does not support gradient checkpointing")
    results = []
    for checkpointed in (False, True):
        model = cell.build()
        batch = cell.batch(model)
        if checkpointed:
            model.activation_checkpointing_enable()
        model.train()
        torch.manual_seed(cell.seed + 5)
        outputs = cell.real_outputs(cell.forward(model, batch), batch)
        cell.loss(outputs).backward()
        results.append(cell.grads(model))
    close_grads(results[1], results[0], "checkpointed vs plain")
    return ""


def check_mixed_tasks_equal_single(cell: Cell) -> str:
    try:
        model = cell.build(num_tasks=3)
    except PStarError as exc:
        raise Skip(f"the method holds one prompt per adapter: {exc}") from exc
    rows = cell.rows((7, 10, 9, 8))
    task_ids = torch.tensor([2, 0, 1, 2])
    batch = cell.batch(model, rows)
    notes = []
    for on in (False, True):
        with torch.no_grad(), with_packing(model, on), packing_module.recording() as records:
            mixed = cell.real_outputs(cell.forward(model, batch, task_ids=task_ids), batch)
            for t in range(3):
                picked = (task_ids == t).nonzero().flatten().tolist()
                sub = cell.batch(model, [rows[i] for i in picked])
                if "decoder_input_ids" in batch:
                    sub["decoder_input_ids"] = batch["decoder_input_ids"][picked]
                single = cell.real_outputs(cell.forward(model, sub, task_ids=torch.full((len(picked),), t)), sub)
                close_rows([mixed[i] for i in picked], single, f"packing={on}: mixed-task rows of task {t} vs alone")
            other = cell.real_outputs(cell.forward(model, batch, task_ids=torch.zeros(4, dtype=torch.long)), batch)
        if torch.allclose(mixed[0], other[0]):
            raise AssertionError("task 2's prompt gives the same output as task 0's: task_ids are ignored")
        if on:
            notes.append(fast_path_note(records))
    return "; ".join(notes)


def check_build_twice_and_refused_load(cell: Cell) -> str:
    from pstar_plugins import build_model, load_adapter
    from pstar_plugins.contract.errors import AdapterError
    from pstar_plugins.mechanisms.adapter_io import read_adapter

    batch = cell.batch(None)
    base = cell.base()
    with torch.no_grad():
        expected = cell.real_outputs(cell.forward(base, batch), batch)
    model = cell.build(base)
    try:
        build_model(base, cell.method, cell.options, tokenizer=cell.tokenizer, plugin_manager=cell.plugin_manager)
    except PStarError as exc:
        if "already" not in str(exc):
            raise AssertionError(f"a second build was refused without saying why: {exc}") from exc
    else:
        raise AssertionError("a second method was built on a model that already carries one")
    with tempfile.TemporaryDirectory() as tmp:
        model.save_adapter(tmp)
        meta, tensors = read_adapter(tmp)
    unwrapped = model.unwrap()
    with torch.no_grad():
        close_rows(cell.real_outputs(cell.forward(unwrapped, batch), batch), expected, "unwrapped vs bare model")
    meta["base_model"]["hidden_size"] = int(meta["base_model"]["hidden_size"]) + 1
    fresh = cell.base()
    try:
        load_adapter(fresh, tmp, contents=(meta, tensors), tokenizer=cell.tokenizer, plugin_manager=cell.plugin_manager)
    except AdapterError:
        pass
    else:
        raise AssertionError("an adapter for another hidden size was loaded")
    with torch.no_grad():
        close_rows(cell.real_outputs(cell.forward(fresh, batch), batch), expected, "base model after a refused load")
    rebuilt = cell.build(fresh)
    disabled_matches_bare(
        cell,
        rebuilt,
        cell.base(),
        cell.batch(rebuilt, side="right"),
        "method built after a refused load, disabled, vs bare model",
    )
    return ""

"""The conformance suite: what every (model, method, options) cell must satisfy, built-in methods
and third-party ones alike.

One call runs it::

    from pstar_plugins.testing.conformance import check_method
    report = check_method(lambda: tiny_model("llama"), "my-method", {"num_virtual_tokens": 4})
    assert report.ok, report.summary()

``assert_conforms`` does the same and fails a test with the summary; the ``pstar_conformance``
pytest fixture hands it to a plugin's own tests. The idea is PEFT's ``PeftCommonTester`` and
pytest's ``pytester``: the library's own guarantees, as a suite an author runs on their method.

A cell either **builds and passes every check**, or is **refused at build time** with a
:class:`~pstar_plugins.errors.PStarError` (the report records the message). A check that does not
apply (no generation for a classification head, no mixed tasks for a one-template method) is
skipped with its reason. The checks:

``disabled_equals_base``
    with the method switched off (``PStarModel.disable_adapter()``), the wrapped model computes
    what the bare model computes: positions, masks and heads untouched.
``trains_only_method_tensors``
    a few optimizer steps change only the trainable tensors, every one of them gets a non-zero
    gradient, and no frozen weight moves.
``padded_equals_alone``
    each row of a padded batch (left and right padding) equals that row run alone, wherever the
    bare model itself is padding-invariant.
``packed_equals_padded``
    with ``packing`` on, values and gradients equal the padded call's (the padding-free path,
    or the reason it stepped aside).
``inference_fast_path``
    under ``no_grad`` with ``packing`` on (the prompts' cache, packed inference) the outputs equal
    the plain ``[P; E]`` call.
``folded_equals_unfolded``
    ``fold()`` keeps the outputs.
``save_load_roundtrip``
    after training, save → load onto a fresh base gives bit-identical trainable tensors
    (everything that was trainable, plugin contributions included) and the same outputs.
``generate_equals_loop``
    greedy cached ``generate()`` on a left-padded batch, with packed prefill and without, equals a
    step-by-step loop without cache.
``checkpointed_gradients``
    gradients with gradient checkpointing equal those without.
``mixed_tasks_equal_single``
    a batch mixing three tasks' prompts equals each task's rows alone, and the tasks differ.
``build_twice_and_refused_load``
    building a second method on a wrapped base is refused with a clear error (never a recursion),
    a refused ``load_adapter`` leaves the base model as it was, and ``unwrap()`` gives it back.

Inputs are random token ids; the method's own extra inputs come from
``PromptMethod.example_inputs``. The method's tensors are perturbed before each check so that a
prompt that is ignored somewhere cannot hide behind a near-zero initialisation.
"""

from __future__ import annotations

import contextlib
import tempfile
import traceback
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import torch
from torch import nn

from pstar_plugins.core import packing as packing_module
from pstar_plugins.errors import PStarError

PASSED, FAILED, SKIPPED = "passed", "failed", "skipped"
CAUSAL, ENCODER, SEQ2SEQ = "causal", "encoder", "seq2seq"
ROW_LENGTHS = (7, 10, 9)
DECODER_LENGTH = 4


class Skip(Exception):
    """Raised by a check that does not apply to this cell; the message is the reason."""


@dataclass
class Outcome:
    check: str
    status: str
    detail: str = ""


@dataclass
class Report:
    """What :func:`check_method` found for one cell."""

    name: str
    refused: str | None = None
    outcomes: list[Outcome] = field(default_factory=list)

    @property
    def failures(self) -> list[Outcome]:
        return [o for o in self.outcomes if o.status == FAILED]

    @property
    def ok(self) -> bool:
        """Refused at build time, or every check passed or did not apply."""
        return not self.failures

    def outcome(self, check: str) -> Outcome:
        return next(o for o in self.outcomes if o.check == check)

    def summary(self) -> str:
        if self.refused is not None:
            return f"{self.name}: refused at build time: {self.refused}"
        lines = [f"{self.name}: {len(self.failures)} of {len(self.outcomes)} checks failed"]
        for o in self.outcomes:
            lines.append(f"  {o.status:<7} {o.check}" + (f": {o.detail}" if o.detail else ""))
        return "\n".join(lines)


# ----------------------------------------------------------------------------- the cell


class Cell:
    """One (model factory, method, options) combination and the helpers the checks share."""

    def __init__(self, factory: Callable[[], nn.Module], method: str, options: dict[str, Any],
                 tokenizer=None, plugin_manager=None, seed: int = 0) -> None:
        self.factory = factory
        self.method = method
        self.options = dict(options)
        self.tokenizer = tokenizer
        self.plugin_manager = plugin_manager
        self.seed = seed
        probe = factory()
        config = probe.config
        self.kind = SEQ2SEQ if getattr(config, "is_encoder_decoder", False) else (
            CAUSAL if probe.can_generate() else ENCODER)
        text = config.get_text_config() if hasattr(config, "get_text_config") else config
        self.vocab = int(getattr(text, "vocab_size"))
        pad = getattr(text, "pad_token_id", None)
        self.pad = int(pad) if pad is not None else 0
        self.eos = getattr(text, "eos_token_id", None)
        self.low = min(3, self.vocab - 1)
        self.supports_checkpointing = bool(getattr(probe, "supports_gradient_checkpointing", False))
        # where the factory puts the model (a GPU check builds on CUDA): every batch goes there
        self.device = next(probe.parameters()).device
        del probe

    # -- models -------------------------------------------------------------------------
    def base(self) -> nn.Module:
        torch.manual_seed(self.seed)
        return self.factory().eval()

    def build(self, base: nn.Module | None = None, perturb: bool = True, **options):
        from pstar_plugins import build_model

        torch.manual_seed(self.seed)
        model = build_model(base if base is not None else self.base(), self.method, {**self.options, **options},
                            tokenizer=self.tokenizer, plugin_manager=self.plugin_manager)
        model.eval()
        if perturb:
            self.perturb(model)
        return model

    def perturb(self, model, seed: int = 1) -> None:
        """Move every trainable tensor well away from its initialisation (seeded)."""
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for _, p in sorted(model.trainable_named_parameters(), key=lambda item: item[0]):
                noise = torch.randn(p.shape, generator=g).to(p.device, p.dtype)
                p.add_(noise * 0.3)

    # -- inputs -------------------------------------------------------------------------
    def rows(self, lengths=ROW_LENGTHS, seed: int = 0) -> list[torch.Tensor]:
        g = torch.Generator().manual_seed(seed)
        return [torch.randint(self.low, self.vocab, (n,), generator=g) for n in lengths]

    def batch(self, model, rows: list[torch.Tensor] | None = None, side: str | None = None, seed: int = 0) -> dict[str, Any]:
        """A padded batch of ``rows`` (left padding for causal LMs, right for the others) with the
        method's extra inputs and, for encoder-decoder models, decoder inputs."""
        rows = rows if rows is not None else self.rows(seed=seed)
        side = side or ("left" if self.kind == CAUSAL else "right")
        length = max(len(r) for r in rows)
        ids = torch.full((len(rows), length), self.pad, dtype=torch.long)
        mask = torch.zeros(len(rows), length, dtype=torch.long)
        for i, r in enumerate(rows):
            start = length - len(r) if side == "left" else 0
            ids[i, start:start + len(r)] = r
            mask[i, start:start + len(r)] = 1
        batch: dict[str, Any] = {"input_ids": ids, "attention_mask": mask}
        if model is not None:
            batch.update(model.method.example_inputs(ids, mask))
        if self.kind == SEQ2SEQ:
            g = torch.Generator().manual_seed(seed + 101)
            batch["decoder_input_ids"] = torch.randint(self.low, self.vocab, (len(rows), DECODER_LENGTH), generator=g)
        return {k: v.to(self.device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}

    def forward(self, model, batch: dict[str, Any], **extra):
        inputs = dict(batch)
        extra = {k: v.to(self.device) if isinstance(v, torch.Tensor) else v for k, v in extra.items()}
        if self.kind == CAUSAL and "logits_to_keep" not in extra:
            extra["logits_to_keep"] = inputs["input_ids"].shape[1]  # every column, the packable call
        return model(**inputs, **extra)

    def real_outputs(self, out, batch: dict[str, Any]) -> list[torch.Tensor]:
        """Each row's outputs at its real positions (a head's row, or decoder logits)."""
        logits = out.logits
        if logits.dim() == 2 or self.kind == SEQ2SEQ:
            return [logits[i].float() for i in range(logits.shape[0])]
        mask = batch["attention_mask"]
        return [logits[i][mask[i].bool()].float() for i in range(logits.shape[0])]

    def loss(self, outputs: list[torch.Tensor]) -> torch.Tensor:
        """A fixed smooth function of every real output (for gradient comparisons)."""
        width = outputs[0].shape[-1]
        g = torch.Generator().manual_seed(7)
        weight = torch.randn(width, generator=g)
        return sum(((o * weight.to(o.device)).sum(-1) ** 2).sum() for o in outputs) / sum(o.numel() for o in outputs)

    def grads(self, model) -> dict[str, torch.Tensor]:
        return {n: (p.grad.detach().clone() if p.grad is not None else torch.zeros_like(p))
                for n, p in model.trainable_named_parameters()}


# ----------------------------------------------------------------------------- comparisons


def _close(got, expected, what: str, rtol: float = 1e-4, atol: float = 2e-5) -> None:
    got, expected = got.float(), expected.float()
    if got.shape != expected.shape:
        raise AssertionError(f"{what}: shape {tuple(got.shape)} != {tuple(expected.shape)}")
    scale = max(1.0, float(expected.abs().max()) if expected.numel() else 1.0)
    if not torch.allclose(got, expected, rtol=rtol, atol=atol * scale):
        diff = float((got - expected).abs().max())
        raise AssertionError(f"{what}: max abs difference {diff:.3g} (scale {scale:.3g})")


def _close_rows(got: list[torch.Tensor], expected: list[torch.Tensor], what: str, **tol) -> None:
    for i, (g, e) in enumerate(zip(got, expected)):
        _close(g, e, f"{what}, row {i}", **tol)


def _close_grads(got: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], what: str) -> None:
    assert got.keys() == expected.keys(), f"{what}: trainable tensors differ"
    for name in expected:
        _close(got[name], expected[name], f"{what}, gradient of {name}", rtol=1e-3, atol=1e-5)


@contextlib.contextmanager
def _packing(model, on: bool) -> Iterator[None]:
    previous = model.packing
    model.packing = on
    try:
        yield
    finally:
        model.packing = previous


# ----------------------------------------------------------------------------- checks


def _disabled_matches_bare(cell: Cell, model, bare, batch: dict[str, Any], what: str) -> str:
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
            _close(out.logits, method.head(method.pool(hidden, batch["attention_mask"])), f"{what} (head over the bare backbone)")
            return "head over the bare backbone"
        _close_rows(cell.real_outputs(out, batch), cell.real_outputs(cell.forward(bare, plain), plain), what)
    return ""


def check_disabled_equals_base(cell: Cell) -> str:
    bare = cell.base()
    model = cell.build()
    rows = cell.rows()
    notes = []
    for side in ("right", "left"):
        if side == "left" and not _padding_invariant(cell, lambda b: cell.forward(bare, b), rows, side):
            # e.g. GPT-2 numbers left padding as positions; the wrapper gives rows their own positions
            notes.append("left padding not compared: the bare model is not invariant to it")
            continue
        batch = cell.batch(model, rows, side)
        notes.append(_disabled_matches_bare(cell, model, bare, batch, f"{side}-padded, disabled method vs bare model"))
    batch = cell.batch(model, rows)
    with torch.no_grad():
        enabled = cell.real_outputs(cell.forward(model, batch), batch)
        with model.disable_adapter():
            disabled = cell.real_outputs(cell.forward(model, batch), batch)
    if all(torch.allclose(a, b) for a, b in zip(enabled, disabled)):
        raise AssertionError("the enabled method changes nothing: its prompt never reaches the model")
    return "; ".join(sorted({n for n in notes if n}))


def _labelled(cell: Cell, model, batch: dict[str, Any]) -> dict[str, Any]:
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


def check_trains_only_method_tensors(cell: Cell) -> str:
    from pstar_plugins import make_optimizer

    model = cell.build()
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    trainable = {n: p.detach().clone() for n, p in model.trainable_named_parameters()}
    if not trainable:
        raise AssertionError("the method has no trainable tensor")
    batch = _labelled(cell, model, cell.batch(model))
    optimizer = make_optimizer(model, 1e-2)
    for step in range(2):
        optimizer.zero_grad()
        out = model(**batch)
        if out.loss is None or not torch.isfinite(out.loss):
            raise AssertionError(f"the call with labels gave loss {out.loss!r}")
        out.loss.backward()
        if step == 0:
            silent = [n for n, p in model.trainable_named_parameters() if p.grad is None or not bool(p.grad.abs().sum() > 0)]
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


def _padding_invariant(cell: Cell, model_call, rows, side: str) -> bool | None:
    """Whether ``model_call`` gives each row of a ``side``-padded batch what it gives the row alone."""
    batch = cell.batch(None, rows, side)
    with torch.no_grad():
        together = cell.real_outputs(model_call(batch), batch)
        for i, r in enumerate(rows):
            alone_batch = cell.batch(None, [r], side)
            if "decoder_input_ids" in batch:
                alone_batch["decoder_input_ids"] = batch["decoder_input_ids"][i:i + 1]
            alone = cell.real_outputs(model_call(alone_batch), alone_batch)[0]
            if not torch.allclose(together[i], alone, rtol=1e-4, atol=2e-5 * max(1.0, float(alone.abs().max()))):
                return False
    return True


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
                        alone_batch["decoder_input_ids"] = batch["decoder_input_ids"][i:i + 1]
                    alone = cell.real_outputs(cell.forward(model, alone_batch), alone_batch)[0]
                    _close(together[i], alone, f"{side}-padded row {i} vs alone")
        except AssertionError:
            if _padding_invariant(cell, lambda b: cell.forward(bare, b), rows, side):
                raise
            # e.g. BART's encoder numbers left padding as positions and takes no position_ids
            notes.append(f"{side} padding not required: the bare model itself is not invariant to it")
    if len(notes) == 2:
        raise Skip("; ".join(notes))
    return "; ".join(notes)


def _fast_path_note(records: list[str]) -> str:
    return "; ".join(sorted(set(records))) if records else "no model call recorded"


def check_packed_equals_padded(cell: Cell) -> str:
    model = cell.build()
    batch = cell.batch(model)
    results = {}
    for on in (False, True):
        model.zero_grad(set_to_none=True)
        with _packing(model, on), packing_module.recording() as records:
            outputs = cell.real_outputs(cell.forward(model, batch), batch)
        cell.loss(outputs).backward()
        results[on] = ([o.detach() for o in outputs], cell.grads(model), records)
    _close_rows(results[True][0], results[False][0], "packed vs padded values")
    _close_grads(results[True][1], results[False][1], "packed vs padded")
    return _fast_path_note(results[True][2])


def check_inference_fast_path(cell: Cell) -> str:
    model = cell.build()
    batch = cell.batch(model)
    with torch.no_grad():
        with _packing(model, False):
            plain = cell.real_outputs(cell.forward(model, batch), batch)
            plain_unkept = cell.real_outputs(model(**batch), batch)
        with _packing(model, True), packing_module.recording() as records:
            fast = cell.real_outputs(cell.forward(model, batch), batch)
            fast_unkept = cell.real_outputs(model(**batch), batch)
    _close_rows(fast, plain, "inference with packing vs without")
    _close_rows(fast_unkept, plain_unkept, "inference with packing vs without (no logits_to_keep)")
    return _fast_path_note(records)


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
    _close_rows(after, before, "folded vs unfolded", atol=5e-5)
    return ""


def check_save_load_roundtrip(cell: Cell) -> str:
    from pstar_plugins import load_adapter, make_optimizer

    model = cell.build()
    batch = _labelled(cell, model, cell.batch(model))
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
    _close_rows(after, expected, "loaded vs saved model", rtol=1e-6, atol=1e-6)
    return f"{len(trained)} tensors bit-exact"


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
        dec = torch.full((batch["input_ids"].shape[0], 1), int(start), dtype=torch.long, device=batch["input_ids"].device)
        extra = model.method.example_inputs(batch["input_ids"], batch["attention_mask"])
        for _ in range(steps):
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], decoder_input_ids=dec,
                           **extra).logits[:, -1]
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
    from pstar_plugins.core.inputs import is_encoder_decoder

    with torch.no_grad(), _packing(model, False):
        try:
            expected, expected_logits, margins = _greedy_loop(cell, model, batch, steps)
        except PStarError as exc:
            raise Skip(f"the method does not generate: {exc}") from exc
    notes = []
    from transformers import LogitsProcessorList

    for on in (False, True):
        recorder = _ScoreRecorder()
        kwargs = dict(max_new_tokens=steps, min_new_tokens=steps, do_sample=False, use_cache=True, pad_token_id=cell.pad,
                      logits_processor=LogitsProcessorList([recorder]))
        extra = {k: v for k, v in batch.items() if k not in ("input_ids", "attention_mask", "decoder_input_ids")}
        with torch.no_grad(), _packing(model, on), packing_module.recording() as records:
            got = model.generate(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], **extra, **kwargs)
        got = got[:, : expected.shape[1]]
        # the first step's scores come from the prompt's cache (packed prefill when on): the
        # strongest check, as greedy tokens of a near-uniform random model rarely change
        first, reference = recorder.scores[0], expected_logits[0]
        finite = torch.isfinite(reference)
        if not torch.equal(torch.isfinite(first), finite):
            raise AssertionError(f"packing={on}: generate()'s first-step scores mask other tokens than the loop's")
        _close(first[finite], reference[finite], f"packing={on}: generate()'s first-step scores vs the loop's logits")
        if not torch.equal(got, expected):
            offset = 1 if is_encoder_decoder(model.base_model) else batch["input_ids"].shape[1]
            diff = (got != expected).nonzero()
            row, col = int(diff[0, 0]), int(diff[0, 1]) - offset
            if 0 <= col < margins.shape[1] and float(margins[row, col]) < 1e-4:
                notes.append(f"packing={on}: differs after a near tie (margin {float(margins[row, col]):.2g})")
                continue
            raise AssertionError(f"packing={on}: generate() != step-by-step loop at row {row}, new token {col}:\n{got}\nvs\n{expected}")
        if on:
            notes.append(_fast_path_note(records))
    return "; ".join(notes)


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
    _close_grads(results[1], results[0], "checkpointed vs plain")
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
        with torch.no_grad(), _packing(model, on), packing_module.recording() as records:
            mixed = cell.real_outputs(cell.forward(model, batch, task_ids=task_ids), batch)
            for t in range(3):
                picked = (task_ids == t).nonzero().flatten().tolist()
                sub = cell.batch(model, [rows[i] for i in picked])
                if "decoder_input_ids" in batch:
                    sub["decoder_input_ids"] = batch["decoder_input_ids"][picked]
                single = cell.real_outputs(cell.forward(model, sub, task_ids=torch.full((len(picked),), t)), sub)
                _close_rows([mixed[i] for i in picked], single, f"packing={on}: mixed-task rows of task {t} vs alone")
            other = cell.real_outputs(cell.forward(model, batch, task_ids=torch.zeros(4, dtype=torch.long)), batch)
        if torch.allclose(mixed[0], other[0]):
            raise AssertionError("task 2's prompt gives the same output as task 0's: task_ids are ignored")
        if on:
            notes.append(_fast_path_note(records))
    return "; ".join(notes)


def check_build_twice_and_refused_load(cell: Cell) -> str:
    from pstar_plugins import build_model, load_adapter
    from pstar_plugins.core.adapter_io import read_adapter
    from pstar_plugins.errors import AdapterError

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
        _close_rows(cell.real_outputs(cell.forward(unwrapped, batch), batch), expected, "unwrapped vs bare model")
    meta["base_model"]["hidden_size"] = int(meta["base_model"]["hidden_size"]) + 1
    fresh = cell.base()
    try:
        load_adapter(fresh, tmp, contents=(meta, tensors), tokenizer=cell.tokenizer, plugin_manager=cell.plugin_manager)
    except AdapterError:
        pass
    else:
        raise AssertionError("an adapter for another hidden size was loaded")
    with torch.no_grad():
        _close_rows(cell.real_outputs(cell.forward(fresh, batch), batch), expected, "base model after a refused load")
    rebuilt = cell.build(fresh)
    _disabled_matches_bare(cell, rebuilt, cell.base(), cell.batch(rebuilt, side="right"),
                           "method built after a refused load, disabled, vs bare model")
    return ""


CHECKS: dict[str, Callable[[Cell], str]] = {
    "disabled_equals_base": check_disabled_equals_base,
    "trains_only_method_tensors": check_trains_only_method_tensors,
    "padded_equals_alone": check_padded_equals_alone,
    "packed_equals_padded": check_packed_equals_padded,
    "inference_fast_path": check_inference_fast_path,
    "folded_equals_unfolded": check_folded_equals_unfolded,
    "save_load_roundtrip": check_save_load_roundtrip,
    "generate_equals_loop": check_generate_equals_loop,
    "checkpointed_gradients": check_checkpointed_gradients,
    "mixed_tasks_equal_single": check_mixed_tasks_equal_single,
    "build_twice_and_refused_load": check_build_twice_and_refused_load,
}


def check_method(factory: Callable[[], nn.Module], method: str, options: dict[str, Any] | None = None, *,
                 checks: list[str] | None = None, tokenizer=None, plugin_manager=None, name: str | None = None,
                 seed: int = 0) -> Report:
    """Run the conformance suite on one cell.

    :param factory: returns a fresh, frozen base model with the same weights on every call
        (e.g. ``lambda: tiny_model("llama")``).
    :param method: a registered method name; ``options`` its options.
    :param checks: names from :data:`CHECKS` (default: all).
    """
    options = dict(options or {})
    report = Report(name or f"{method} on {getattr(factory(), 'config', None).model_type}")
    cell = Cell(factory, method, options, tokenizer, plugin_manager, seed)
    try:
        cell.build()
    except PStarError as exc:
        report.refused = f"{type(exc).__name__}: {exc}"
        return report
    for check in checks or list(CHECKS):
        try:
            detail = CHECKS[check](cell)
            report.outcomes.append(Outcome(check, PASSED, detail or ""))
        except Skip as exc:
            report.outcomes.append(Outcome(check, SKIPPED, str(exc)))
        except Exception as exc:  # a failure of the cell, whatever raised it
            last = traceback.extract_tb(exc.__traceback__)[-1]
            where = f" [{last.filename.rsplit('/', 1)[-1]}:{last.lineno}]" if not isinstance(exc, AssertionError) else ""
            report.outcomes.append(Outcome(check, FAILED, f"{type(exc).__name__}: {exc}{where}"))
    return report


def assert_conforms(factory: Callable[[], nn.Module], method: str, options: dict[str, Any] | None = None,
                    allow_refusal: bool = False, **kwargs) -> Report:
    """:func:`check_method`, failing with its summary; a build-time refusal fails too unless
    ``allow_refusal``."""
    report = check_method(factory, method, options, **kwargs)
    if report.refused is not None and not allow_refusal:
        raise AssertionError(report.summary())
    if not report.ok:
        raise AssertionError(report.summary())
    return report

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
:class:`~pstar_plugins.contract.errors.PStarError` (the report records the message). A check that does not
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
``one_pass_scoring``
    on a causal LM whose fast-path record allows it, multi-token label words scored in one pass
    (the input once, every class's continuation once from its cache) equal the per-class loop in
    value and in the gradients that reach the method, padded and packed; skipped with the
    record's reason elsewhere.

Inputs are random token ids; the method's own extra inputs come from
``PromptMethod.example_inputs``. The method's tensors are perturbed before each check so that a
prompt that is ignored somewhere cannot hide behind a near-zero initialisation.
"""

from __future__ import annotations

import traceback
from typing import Any, Callable

from torch import nn

from pstar_plugins.contract.errors import PStarError
from pstar_plugins.testing.conformance.cell import (
    CAUSAL,
    DECODER_LENGTH,
    ENCODER,
    FAILED,
    PASSED,
    ROW_LENGTHS,
    SEQ2SEQ,
    SKIPPED,
    Cell,
    Outcome,
    Report,
    Skip,
)
from pstar_plugins.testing.conformance.checks import (
    check_build_twice_and_refused_load,
    check_checkpointed_gradients,
    check_disabled_equals_base,
    check_folded_equals_unfolded,
    check_inference_fast_path,
    check_mixed_tasks_equal_single,
    check_packed_equals_padded,
    check_padded_equals_alone,
    check_save_load_roundtrip,
    check_trains_only_method_tensors,
)
from pstar_plugins.testing.conformance.generation import check_generate_equals_loop
from pstar_plugins.testing.conformance.scoring import check_one_pass_scoring

__all__ = [
    "CAUSAL",
    "CHECKS",
    "DECODER_LENGTH",
    "ENCODER",
    "FAILED",
    "PASSED",
    "ROW_LENGTHS",
    "SEQ2SEQ",
    "SKIPPED",
    "Cell",
    "Outcome",
    "Report",
    "Skip",
    "assert_conforms",
    "check_build_twice_and_refused_load",
    "check_checkpointed_gradients",
    "check_disabled_equals_base",
    "check_folded_equals_unfolded",
    "check_generate_equals_loop",
    "check_inference_fast_path",
    "check_method",
    "check_mixed_tasks_equal_single",
    "check_packed_equals_padded",
    "check_padded_equals_alone",
    "check_save_load_roundtrip",
    "check_trains_only_method_tensors",
]

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
    "one_pass_scoring": check_one_pass_scoring,
}


def check_method(
    factory: Callable[[], nn.Module],
    method: str,
    options: dict[str, Any] | None = None,
    *,
    checks: list[str] | None = None,
    tokenizer=None,
    plugin_manager=None,
    name: str | None = None,
    seed: int = 0,
) -> Report:
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
            where = (
                f" [{last.filename.rsplit('/', 1)[-1]}:{last.lineno}]" if not isinstance(exc, AssertionError) else ""
            )
            report.outcomes.append(Outcome(check, FAILED, f"{type(exc).__name__}: {exc}{where}"))
    return report


def assert_conforms(
    factory: Callable[[], nn.Module],
    method: str,
    options: dict[str, Any] | None = None,
    allow_refusal: bool = False,
    **kwargs,
) -> Report:
    """:func:`check_method`, failing with its summary; a build-time refusal fails too unless
    ``allow_refusal``."""
    report = check_method(factory, method, options, **kwargs)
    if report.refused is not None and not allow_refusal:
        raise AssertionError(report.summary())
    if not report.ok:
        raise AssertionError(report.summary())
    return report

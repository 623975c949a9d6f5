"""The conformance matrix: every tiny architecture × every built-in method through the suite.

``python -m tests.matrix --write`` runs every cell (about five minutes on 2 cores), records what
each did in ``tests/matrix_record.json`` and renders ``docs/architectures.md`` from the record.
``tests/test_matrix.py`` keeps behaviour and documentation apart: each cell's test asserts what
the cell does (conforms, or is refused at build time with a clear message); one test compares the
cells that ran with the record, so a release upstream that makes a cell pass (or fail) fails that
one test with the command that updates the record; one test checks the document is the record's
rendering.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "architectures.md"
RECORD = ROOT / "tests" / "matrix_record.json"
METHODS = ("prompt-tuning", "prefix-tuning", "p-tuning", "p-tuning-v2")
TARGET = 146  # cells that pass today (6 are refused at build time, see the header): fewer is a regression


def options(arch: str, method: str) -> dict:
    from pstar_plugins.testing.architectures import KIND
    from tests.helpers import METHOD_OPTIONS

    opts = dict(METHOD_OPTIONS[method])
    if method == "p-tuning-v2" and KIND[arch] == "seq2seq-lm":
        opts["head"] = "none"  # deep prompts with the LM head: the classification heads are for encoders and decoders
    return opts


def cells() -> list[tuple[str, str]]:
    from pstar_plugins.testing.architectures import ARCHITECTURES

    return [(arch, method) for arch in ARCHITECTURES for method in METHODS]


def run(arch: str, method: str):
    from pstar_plugins.testing.architectures import tiny_model
    from pstar_plugins.testing.conformance import check_method

    return check_method(lambda: tiny_model(arch), method, options(arch, method), name=f"{method} on {arch}")


def _fast_path(report, arch: str) -> str:
    """How the cell's calls ran (padding-free, or padded and why) and, on a causal LM, how its
    multi-token label words are scored (in one pass, or per class and why)."""
    from pstar_plugins.testing.architectures import KIND

    detail = report.outcome("packed_equals_padded").detail
    if "call: packed" in detail:
        calls = "padding-free"
    elif found := re.search(r"padded \((.*)\)", detail):
        calls = f"padded: {found.group(1)}"
    else:
        calls = "padded: " + {"masked-lm": "encoder-only model", "seq2seq-lm": "encoder-decoder model"}.get(
            KIND[arch], "direct call"
        )
    # the other paths each cell's checks took: a path that stops applying moves the cell
    served = [
        name
        for name, check, sign in (
            ("packed prefill", "generate_equals_loop", "prefill: packed"),
            ("prompt cache", "inference_fast_path", "prompt cache: served"),
        )
        if sign in report.outcome(check).detail
    ]
    calls = "; ".join([calls, *served])
    scoring = report.outcome("one_pass_scoring")
    if scoring.status == "passed":
        return f"{calls}; one-pass scoring"
    if scoring.detail.startswith("scored per class: "):
        return f"{calls}; {scoring.detail}"
    return calls


def observe(arch: str, method: str, report) -> dict:
    """What one cell did, in the record's form: passes (with its fast path), refused (with the
    message) or fails (with the checks that failed)."""
    if report.refused is not None:
        result, detail = "refused", report.refused.split(": ", 1)[-1].replace("|", "/")
    elif not report.ok:
        result, detail = "fails", ", ".join(o.check for o in report.failures)
    else:
        result, detail = "passes", _fast_path(report, arch)
    return {"architecture": arch, "method": method, "result": result, "backend": backend(arch), "detail": detail}


def backend(arch: str) -> str:
    """The attention implementation a cell runs on (``tiny_model``'s: sdpa, or eager for the
    families without an sdpa kernel). bench/gpu_check.sh checks flex_attention and
    flash_attention_2 on a GPU."""
    from pstar_plugins.testing.architectures import ATTN_FALLBACK

    return "eager" if arch in ATTN_FALLBACK else "sdpa"


def recorded() -> dict[tuple[str, str], dict]:
    """The recorded cells (``tests/matrix_record.json``), keyed by ``(architecture, method)``."""
    return {(r["architecture"], r["method"]): r for r in json.loads(RECORD.read_text())}


def write_record(rows: list[dict]) -> None:
    """One cell a line, so a moved verdict is a one-line diff."""
    lines = ",\n".join(" " + json.dumps(r, ensure_ascii=False) for r in rows)
    RECORD.write_text("[\n" + lines + "\n]\n")


def moved(observed: dict, record: dict | None) -> str | None:
    """How a cell's observation differs from its record, or ``None``."""
    if record is None:
        return f"{observed['architecture']} × {observed['method']}: not recorded, now {observed['result']}"
    if (observed["result"], observed["detail"], observed.get("backend")) == (
        record["result"],
        record["detail"],
        record.get("backend"),
    ):
        return None
    what = f"{record['result']} → {observed['result']}"
    if observed["result"] == record["result"]:
        what += f" ({record['detail']!r} → {observed['detail']!r})"
    elif observed["result"] != "passes":
        what += f" ({observed['detail']})"
    return f"{observed['architecture']} × {observed['method']}: {what}"


def row(record: dict) -> str:
    """The document's line for one recorded cell."""
    mark = {"passes": "✓", "refused": "refused", "fails": "**fails**"}[record["result"]]
    return f"| {record['architecture']} | {record['method']} | {mark} | {record['backend']} | {record['detail']} |"


HEADER = """# Architectures

What every built-in method does on each model family, generated by `python -m tests.matrix
--write` from the conformance suite (`pstar_plugins.testing.conformance`) run on a tiny random
model of each family (`pstar_plugins.testing.architectures`); `tests/test_matrix.py` fails when
a row no longer says what its cell does.

A ✓ cell passed every check of the suite: the method switched off gives the bare model's
outputs; only the method's tensors train; padded rows equal rows alone; packed equals padded
(values and gradients); inference fast paths equal the plain call; folding, save/load and
greedy `generate()` (step-by-step reference, packed prefill included) agree; checkpointed
gradients equal plain ones; mixed-task rows equal single-task rows; a second build and a
refused load leave the base model usable; one-pass label-word scores equal the per-class loop.
*Fast path* says whether training and scoring calls run padding-free on that family (an
allow-list, `mechanisms.fast_paths.PADDING_FREE_FAMILIES`, of the families verified here) or
padded, and why; whether `generate()` prefilled the prompts packed (*packed prefill*) and
inference calls were served from the prompts' cache (*prompt cache*, prompt tuning), each where
it took place in the checks above; and on a causal LM whether multi-token label words are scored
in one pass (checked against the per-class loop) or per class, and why. A refused
cell is refused when the model is built, with the message shown; no cell builds and then gives
wrong numbers.

Prefix tuning and P-tuning v2 are refused on BLOOM, MPT and DeBERTa-v2: these families compute
attention in their own code instead of calling transformers' attention interface, the only place
where a prefix can join the keys and values after the positions are applied (docs/design.md).
Prompt tuning and P-tuning work there. Falcon was refused for the same reason until transformers
5.25 moved it onto the attention interface; the build's attention probe finds its sites since,
and its cells pass the whole suite, padding-free included. The other way in is the KV cache,
which is how PEFT reaches BLOOM. A prototype (the prefix held in a cache layer that returns
prefix + new keys without storing them, the mask extended by the prefix length, explicit
position ids) trained on tiny Falcon and BLOOM and kept left-padded rows equal to rows alone,
but failed with gradient checkpointing on the ALiBi/own-attention families (transformers turns
the cache off under checkpointing, and the masks no longer match the keys), gave MPT rows that
change with left padding (its ALiBi counts columns), and would give BLOOM's prefix ALiBi
distances that prefixes elsewhere do not have. DeBERTa-v2's disentangled attention has no cache.
Until those can pass the whole suite, the cells stay refused at build time.

*Checked on* names the attention implementation the cell ran on here (CPU, fp32); `bash
bench/gpu_check.sh` checks flex_attention and flash_attention_2 on a GPU.

| architecture | method | result | checked on | fast path or reason |
|---|---|---|---|---|
"""


def render(rows: list[dict]) -> str:
    passed = sum(1 for r in rows if r["result"] == "passes")
    lines = "\n".join(row(r) for r in rows)
    return HEADER + lines + f"\n\n{passed} of {len(rows)} cells pass; the others are refused at build time.\n"


if __name__ == "__main__":
    if "--write" in sys.argv:
        observed = []
        for arch, method in cells():
            observed.append(observe(arch, method, run(arch, method)))
            print(row(observed[-1]), flush=True)
        write_record(observed)
        DOC.write_text(render(observed))
        print(f"wrote {RECORD.relative_to(ROOT)} and {DOC.relative_to(ROOT)}")
    elif "--render" in sys.argv:  # the header changed, not the cells: render the record again
        record = recorded()
        DOC.write_text(render([record[cell] for cell in cells()]))
        print(f"wrote {DOC.relative_to(ROOT)} from {RECORD.relative_to(ROOT)}")
    else:
        print("python -m tests.matrix --write   # run every cell, rewrite the record and docs/architectures.md")
        print("python -m tests.matrix --render  # rewrite docs/architectures.md from the record")

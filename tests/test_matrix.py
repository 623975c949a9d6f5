"""Every (architecture, method) cell passes the conformance suite or is refused at build time
with an error naming the model type, the method and what to use instead.

Behaviour and documentation are tested apart: a cell's test asserts what the cell does, whatever
the record says; ``test_cells_that_ran_match_the_record`` compares what the cells did with
``tests/matrix_record.json`` (a release upstream that lets a refused cell pass fails that one test,
with the command that updates the record); ``test_document_is_the_rendering_of_the_record``
checks ``docs/architectures.md`` against the record.
"""

import json
import os

import pytest

from tests.matrix import DOC, TARGET, cells, moved, observe, recorded, render, run

CELLS = cells()
#: what each cell that ran in this session did, for the comparison with the record
OBSERVED: dict[tuple[str, str], dict] = {}


def _keep(observation: dict) -> None:
    OBSERVED[(observation["architecture"], observation["method"])] = observation
    path = os.environ.get("PSTAR_MATRIX_OBSERVED")  # scripts/latest.sh collects every cell's observation
    if path:
        with open(path, "a", encoding="utf-8") as out:
            out.write(json.dumps(observation, ensure_ascii=False) + "\n")


@pytest.mark.slow
@pytest.mark.parametrize("arch,method", CELLS, ids=[f"{a}-{m}" for a, m in CELLS])
def test_cell_conforms_or_is_refused_at_build_time(arch, method):
    report = run(arch, method)
    _keep(observe(arch, method, report))
    if report.refused is not None:
        from pstar_plugins.testing.architectures import tiny_config

        model_type = tiny_config(arch)[1].model_type
        assert method in report.refused and repr(model_type) in report.refused, report.refused
        assert "Use " in report.refused or "use " in report.refused, report.refused  # what to use instead
    else:
        assert report.ok, report.summary()


@pytest.mark.slow
def test_cells_that_ran_match_the_record():
    if not OBSERVED:
        pytest.skip("no matrix cell ran in this session")
    record = recorded()
    changes = [m for m in (moved(o, record.get(cell)) for cell, o in OBSERVED.items()) if m]
    assert not changes, (
        "cells no longer do what tests/matrix_record.json says:\n  "
        + "\n  ".join(changes)
        + "\nrun python -m tests.matrix --write (it rewrites the record and docs/architectures.md)"
    )


def test_document_is_the_rendering_of_the_record():
    record = recorded()
    assert sorted(record) == sorted(CELLS), (
        "the record does not list every cell once: run python -m tests.matrix --write"
    )
    rows = [record[cell] for cell in CELLS]
    assert DOC.read_text() == render(rows), "docs/architectures.md is stale: run python -m tests.matrix --write"
    assert sum(r["result"] == "passes" for r in rows) >= TARGET
    assert not any(r["result"] == "fails" for r in rows)


def test_padding_free_families_are_verified_in_the_matrix():
    """The allow-lists hold only families whose cells run padding-free, score label words in one
    pass (except through a classification head, which has no label words) and pass here."""
    from pstar_plugins.mechanisms.fast_paths import ONE_PASS_FAMILIES, PADDING_FREE_FAMILIES
    from pstar_plugins.testing.architectures import ARCHITECTURES, tiny_config
    from tests.matrix import METHODS

    record = recorded()
    by_type = {tiny_config(a)[1].model_type: a for a in ARCHITECTURES}
    for model_type in PADDING_FREE_FAMILIES:
        arch = by_type[model_type]
        for method in METHODS:
            cell = record[(arch, method)]
            assert cell["result"] == "passes" and cell["detail"].startswith("padding-free; "), cell
            one_pass = "one-pass scoring" in cell["detail"]
            assert one_pass or (model_type not in ONE_PASS_FAMILIES or "classification head" in cell["detail"]), cell


def test_a_moved_verdict_is_reported_with_both_sides():
    before = {
        "architecture": "falcon",
        "method": "prefix-tuning",
        "result": "refused",
        "detail": "computes attention...",
    }
    after = dict(before, result="passes", detail="padded: direct call")
    assert moved(after, before) == "falcon × prefix-tuning: refused → passes"
    assert moved(before, before) is None
    assert "passes → fails (prompt_only_gradients)" in moved(
        dict(before, result="fails", detail="prompt_only_gradients"),
        dict(before, result="passes", detail="padding-free"),
    )

"""Every (architecture, method) cell passes the conformance suite or is refused at build time
with an error naming the model type, the method and what to use instead; docs/architectures.md
says which, cell by cell."""

import pytest

from tests.matrix import DOC, METHODS, TARGET, cells, documented_rows, render, row, run

CELLS = cells()


@pytest.mark.slow
@pytest.mark.parametrize("arch,method", CELLS, ids=[f"{a}-{m}" for a, m in CELLS])
def test_cell_conforms_or_is_refused_at_build_time(arch, method):
    report = run(arch, method)
    if report.refused is not None:
        from pstar_plugins.testing.architectures import tiny_config

        model_type = tiny_config(arch)[1].model_type
        assert method in report.refused and repr(model_type) in report.refused, report.refused
        assert "Use " in report.refused or "use " in report.refused, report.refused  # what to use instead
    else:
        assert report.ok, report.summary()
    documented = documented_rows().get((arch, method))
    assert documented == row(arch, method, report), "docs/architectures.md is stale: run python -m tests.matrix --write"


def test_document_lists_every_cell_once_and_meets_the_target():
    documented = documented_rows()
    assert sorted(documented) == sorted(CELLS)
    lines = [documented[cell] for cell in CELLS]
    assert DOC.read_text() == render(lines), "docs/architectures.md is stale: run python -m tests.matrix --write"
    assert sum("| ✓ |" in line for line in lines) >= TARGET
    assert not any("**fails**" in line for line in lines)


def test_padding_free_families_are_verified_in_the_matrix():
    """The allow-list holds only families whose cells run padding-free and pass here."""
    from pstar_plugins.core.packing import PADDING_FREE_FAMILIES
    from pstar_plugins.testing.architectures import ARCHITECTURES, tiny_config

    documented = documented_rows()
    by_type = {tiny_config(a)[1].model_type: a for a in ARCHITECTURES}
    for model_type in PADDING_FREE_FAMILIES:
        arch = by_type[model_type]
        for method in METHODS:
            line = documented[(arch, method)]
            assert "| ✓ | padding-free |" in line, line

"""Each bad input gives the documented error, and docs/errors.md is the rendering of that list."""

import importlib

import pytest

from pstar_plugins.errors import PStarError
from tests.error_cases import BEFORE_COMMAND, CASES, DOC, render, tree


@pytest.mark.parametrize("case", [c for c in CASES if c.run is not None], ids=lambda c: c.what)
def test_bad_input_gives_the_documented_error(case, tmp_path, capsys):
    expected_type = case.error.split("(")[-1].rstrip(")") if case.error.startswith("exit 2") else case.error
    BEFORE_COMMAND.clear()
    with pytest.raises(PStarError) as info:
        case.run(tmp_path)
    assert type(info.value).__name__ == expected_type
    assert case.message in str(info.value)
    if "train" in BEFORE_COMMAND:  # the refused training command wrote, moved and removed nothing
        out, before = BEFORE_COMMAND.pop("train")
        assert tree(out) == before, f"{out} changed: {before} -> {tree(out)}"
    assert not (tmp_path / "out" / "adapter").exists()


@pytest.mark.parametrize("case", [c for c in CASES if c.run is None], ids=lambda c: c.what)
def test_fault_rows_point_at_existing_tests(case):
    for ref in case.test.split(", "):
        module, _, name = ref.partition("::")
        if module:
            mod = importlib.import_module(module.replace("/", ".").removesuffix(".py"))
        assert hasattr(mod, name), ref


def test_docs_table_is_current():
    assert DOC.read_text() == render(), "docs/errors.md is stale: run python -m tests.error_cases --write"

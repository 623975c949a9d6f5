"""Each bad input raises the exception type and message its case names (tests/error_cases.py, the
single source), each fault names a test that exists, and docs/errors.md is the rendering of the list."""

import importlib

import pytest

from pstar_plugins.contract.errors import PStarError
from tests.error_cases import BEFORE_COMMAND, CASES, DOC, Case, Fault, render, tree


@pytest.mark.parametrize("case", [c for c in CASES if isinstance(c, Case)], ids=lambda c: c.what)
def test_bad_input_raises_the_error_of_its_case(case, tmp_path, capsys):
    BEFORE_COMMAND.clear()
    with pytest.raises(PStarError) as info:
        case.run(tmp_path)
    assert type(info.value) is case.raises, f"{type(info.value).__name__}: {info.value}"
    assert case.message in str(info.value)
    if "train" in BEFORE_COMMAND:  # the refused training command wrote, moved and removed nothing
        out, before = BEFORE_COMMAND.pop("train")
        assert tree(out) == before, f"{out} changed: {before} -> {tree(out)}"
    assert not (tmp_path / "out" / "adapter").exists()


@pytest.mark.parametrize("case", [c for c in CASES if isinstance(c, Fault)], ids=lambda c: c.what)
def test_fault_rows_point_at_existing_tests(case):
    for ref in case.test.split(", "):
        module, _, name = ref.partition("::")
        mod = importlib.import_module(module.replace("/", ".").removesuffix(".py"))
        assert hasattr(mod, name), ref


def test_docs_table_is_current():
    assert DOC.read_text() == render(), "docs/errors.md is stale: run python -m tests.error_cases --write"

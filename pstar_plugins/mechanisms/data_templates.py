"""Default templates that follow the data's own text columns instead of one task's wording.

A method whose config has a ``template`` (P-tuning) gets ``[P1; X1; P2; X2; ...; Pk+1]`` built
from the data: a group of continuous tokens before each text column and one more before the
answer, the layout of Liu et al. 2021 ("GPT Understands, Too", section 3: prompts around the
input and before the target), with no words from any one task. The other methods' default,
``Review: {sentence} Sentiment:{answer}``, is worded for one text column: it is pointed at the
data's one text column when there is exactly one; with several, a run is refused with a template
built from the columns to pass (docs/recipes.md, issue 18).
"""

from __future__ import annotations

from typing import Any

SOFT_TOKENS_PER_SLOT = 3
SAMPLE_ROWS = 100  # rows looked at to tell a text column from an id or number column


def _is_number(value: str) -> bool:
    try:
        float(value)
    except ValueError:
        return False
    return True


def text_columns(rows: list[dict[str, Any]], ignored: set[str]) -> list[str]:
    """The columns of ``rows`` that hold text, in the file's order: string values (in every one
    of the first rows) that are not all numbers (a TSV's ``idx`` column), minus ``ignored`` (the
    label or target column) and names a template slot cannot hold."""
    sample = rows[:SAMPLE_ROWS]
    out = []
    for column in rows[0]:
        if column in ignored or "{" in column or "}" in column:
            continue
        values = [row.get(column) for row in sample]
        if all(isinstance(v, str) for v in values) and not all(_is_number(v) for v in values):
            out.append(column)
    return out


def soft_prompt_template(columns: list[str], tokens: int = SOFT_TOKENS_PER_SLOT) -> str:
    """``{soft:3} {a} {soft:3} {b} {soft:3}{answer}`` for columns ``a`` and ``b``."""
    soft = f"{{soft:{tokens}}}"
    return " ".join(f"{soft} {{{c}}}" for c in columns) + f" {soft}{{answer}}"


def worded_template(columns: list[str]) -> str:
    """A plain template for several text columns, one per line, as typed on a command line."""
    return "\\n".join(f"{c}: {{{c}}}" for c in columns) + "\\nAnswer:{answer}"

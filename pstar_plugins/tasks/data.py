"""Reading the user's data files (CSV, TSV, JSONL) with errors that name the file and row."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

from pstar_plugins.errors import DataError


def read_examples(path: str | Path, limit: int | None = None) -> list[dict[str, Any]]:
    """Rows of ``path`` as dicts. TSV is read without quoting (GLUE's convention); text is stripped."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"data file {path} does not exist; check --train-file / --validation-file.")
    suffix = path.suffix.lower()
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as exc:
        line = path.read_bytes()[: exc.start].count(b"\n") + 1
        raise DataError(f"{path}: line {line} is not valid UTF-8 ({exc.reason}); re-save the file as UTF-8.") from exc
    rows: list[dict[str, Any]] = []
    if suffix in (".jsonl", ".json"):
        for number, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"{path}: row {number} is not valid JSON ({exc.msg}).") from exc
            if not isinstance(row, dict):
                raise DataError(f"{path}: row {number} is a JSON {type(row).__name__}; expected an object.")
            rows.append(row)
            if limit and len(rows) >= limit:
                break
    elif suffix in (".tsv", ".csv"):
        delimiter = "\t" if suffix == ".tsv" else ","
        quoting = csv.QUOTE_NONE if suffix == ".tsv" else csv.QUOTE_MINIMAL
        reader = csv.reader(text.splitlines(), delimiter=delimiter, quoting=quoting)
        header = next(reader, None)
        if not header:
            raise DataError(f"{path} is empty; expected a header row and examples.")
        for number, values in enumerate(reader, start=2):
            if not values:
                continue
            if len(values) != len(header):
                raise DataError(f"{path}: row {number} has {len(values)} fields, the header has {len(header)}.")
            rows.append({k: v.strip() for k, v in zip(header, values)})
            if limit and len(rows) >= limit:
                break
    else:
        raise DataError(f"{path}: unsupported file type {suffix!r}; use .csv, .tsv or .jsonl.")
    if not rows:
        raise DataError(f"{path} holds no examples.")
    return rows


def labels_of(rows: list[dict[str, Any]], column: str, path: str, classes: list[str]) -> list[int]:
    """Map each row's label to a class index; accepts the index itself or the class name."""
    out = []
    for number, row in enumerate(rows, start=1):
        if column not in row:
            raise DataError(f"{path}: row {number} has no column {column!r} (columns: {sorted(row)}); set --label-column.")
        value = str(row[column]).strip()
        if value in classes:
            out.append(classes.index(value))
        elif value.lstrip("-").isdigit() and 0 <= int(value) < len(classes):
            out.append(int(value))
        else:
            raise DataError(f"{path}: row {number} has label {value!r}; expected one of {classes} or an index below {len(classes)}.")
    return out

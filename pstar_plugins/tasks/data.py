"""Reading the user's data files (CSV, TSV, JSONL) with errors that name the file and row."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

from pstar_plugins.contract.errors import DataError


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
            raise DataError(
                f"{path}: row {number} has no column {column!r} (columns: {sorted(row)}); set --label-column."
            )
        value = str(row[column]).strip()
        if value in classes:
            out.append(classes.index(value))
        elif value.lstrip("-").isdigit() and 0 <= int(value) < len(classes):
            out.append(int(value))
        else:
            raise DataError(
                f"{path}: row {number} has label {value!r}; expected one of {classes} or an index below "
                f"{len(classes)}. Set --label-words to the data's labels, in class order (or --label-column)."
            )
    return out


def read_dataset(name: str, split: str, config: str | None = None, limit: int | None = None) -> list[dict[str, Any]]:
    """Rows of a Hugging Face ``datasets`` dataset: a hub id (``glue`` with config ``sst2``,
    ``imdb``, ``user/name``) or a local dataset folder, one split."""
    try:
        import datasets
    except ImportError as exc:  # pragma: no cover - a declared dependency
        raise DataError("--dataset needs the `datasets` package: pip install datasets") from exc
    try:
        data = datasets.load_dataset(name, config, split=split)
    except Exception as exc:  # the library raises many types (connection, missing config, bad split)
        raise DataError(
            f"could not load split {split!r} of dataset {name!r}"
            + (f" (config {config!r})" if config else "")
            + f": {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}. Check the dataset id, "
            "--dataset-config and the split names; without a hub, pass local files with --train-file/--validation-file."
        ) from exc
    if limit:
        data = data.select(range(min(limit, len(data))))
    rows = [dict(row) for row in data]
    if not rows:
        raise DataError(f"split {split!r} of dataset {name!r} holds no examples.")
    return rows


def rename_columns(rows: list[dict[str, Any]], mapping: dict[str, str], source: str) -> list[dict[str, Any]]:
    """Rename columns (``{"text": "sentence"}``: the data's ``text`` fills the template's ``{sentence}``)."""
    if not mapping:
        return rows
    missing = sorted(set(mapping) - set(rows[0]))
    if missing:
        raise DataError(
            f"{source}: --column {', '.join(f'{m}=...' for m in missing)} names no column "
            f"(columns: {sorted(rows[0])}); use the data's own column names on the left."
        )
    return [{mapping.get(k, k): v for k, v in row.items()} for row in rows]


def parse_column_mapping(pairs: list[str]) -> dict[str, str]:
    """``["text=sentence", "y=label"]`` → ``{"text": "sentence", "y": "label"}``."""
    from pstar_plugins.contract.errors import ConfigError

    mapping = {}
    for pair in pairs or []:
        source, sep, target = pair.partition("=")
        if not sep or not source.strip() or not target.strip():
            raise ConfigError(f"--column {pair!r}: expected DATA_COLUMN=NAME, e.g. --column text=sentence.")
        mapping[source.strip()] = target.strip()
    return mapping


def load_split(
    file: str | None,
    dataset: str | None,
    dataset_config: str | None,
    split: str,
    limit: int | None,
    columns: dict[str, str],
) -> tuple[list[dict[str, Any]], str]:
    """Rows and a name for error messages, from a file or, when ``dataset`` is set, a datasets split."""
    if dataset:
        source = f"{dataset}[{split}]"
        rows = read_dataset(dataset, split, dataset_config, limit)
    else:
        source = str(file)
        rows = read_examples(file, limit)
    return rename_columns(rows, columns, source), source

"""Observations that tests and reports switch on: which path a call took, what a save gathered.

A module keeps one :class:`Recorder`; production code calls :meth:`Recorder.add`, which does
nothing unless a ``with recorder.recording() as records:`` block is open, so nothing accumulates
in a long run.
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator


class Recorder:
    """Hands every :meth:`add` to each open :meth:`recording` block's list."""

    def __init__(self) -> None:
        self._open: list[list[Any]] = []

    def __bool__(self) -> bool:
        """Whether a block is open (callers skip building a record when none is)."""
        return bool(self._open)

    @contextlib.contextmanager
    def recording(self) -> Iterator[list[Any]]:
        records: list[Any] = []
        self._open.append(records)
        try:
            yield records
        finally:
            self._open.remove(records)

    def add(self, item: Any) -> None:
        for records in self._open:
            records.append(item)

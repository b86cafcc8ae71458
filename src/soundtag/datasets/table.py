"""Careful CSV reading: every complaint names the file and the line."""

from __future__ import annotations

import csv
import logging
from collections.abc import Sequence
from pathlib import Path

from ..errors import DataError

log = logging.getLogger("soundtag")


class Table:
    """A CSV's rows as dicts of stripped strings, with their line numbers.

    A byte-order mark and whitespace around fields are removed with a warning;
    a missing column, an empty file or a duplicate key is a `DataError`.
    """

    def __init__(self, path: Path, warnings: list[str]):
        self.path = path
        self.warnings = warnings
        try:
            raw = path.read_bytes()
        except OSError as e:
            raise DataError(f"{path}: cannot read ({e.strerror})") from None
        if raw.startswith(b"\xef\xbb\xbf"):
            self.warn("starts with a byte-order mark (ignored)")
            raw = raw[3:]
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise DataError(f"{path}: not UTF-8 text (byte {e.start})") from None
        rows = list(csv.reader(text.splitlines()))
        if not rows or not any(rows[0]):
            raise DataError(f"{path}: empty file, expected a header line")
        self.columns = [self._strip(c, 1) for c in rows[0]]
        self.rows: list[tuple[int, dict[str, str]]] = []
        for line, values in enumerate(rows[1:], start=2):
            if not any(v.strip() for v in values):
                continue
            if len(values) != len(self.columns):
                raise DataError(f"{path} line {line}: {len(values)} fields, the header has {len(self.columns)}")
            self.rows.append((line, {c: self._strip(v, line) for c, v in zip(self.columns, values)}))
        if not self.rows:
            raise DataError(f"{path}: no rows after the header line")

    def warn(self, message: str, line: int | None = None) -> None:
        text = f"{self.path}{f' line {line}' if line else ''}: {message}"
        self.warnings.append(text)
        log.warning(text)

    def _strip(self, value: str, line: int) -> str:
        stripped = value.strip()
        if stripped != value:
            self.warn(f"stray whitespace around {stripped!r} (removed)", line)
        return stripped

    def require(self, *columns: str) -> None:
        missing = [c for c in columns if c not in self.columns]
        if missing:
            raise DataError(f"{self.path}: missing column(s) {', '.join(missing)} "
                            f"(found: {', '.join(self.columns)})")

    def pick(self, candidates: Sequence[str], what: str, required: bool = True) -> str | None:
        """The first of `candidates` that is a column of this table."""
        for c in candidates:
            if c in self.columns:
                return c
        if required:
            raise DataError(f"{self.path}: no {what} column; expected one of {', '.join(candidates)} "
                            f"(found: {', '.join(self.columns)}); name it with the column-mapping options")
        return None

    def unique(self, column: str) -> None:
        """Fail on a value of `column` that appears twice."""
        seen: dict[str, int] = {}
        for line, row in self.rows:
            value = row[column]
            if value in seen:
                raise DataError(f"{self.path} line {line}: duplicate {column} {value!r} (first on line {seen[value]})")
            seen[value] = line


def split_labels(text: str, sep: str = ",") -> list[str]:
    """Labels of a comma-joined (or `sep`-joined) field, empty parts dropped."""
    return [p.strip() for p in text.split(sep) if p.strip()]


def check_labels(table: Table, line: int, labels: list[str], classes: set[str] | None) -> None:
    """Fail on an empty label set or a label outside a known vocabulary."""
    if not labels:
        raise DataError(f"{table.path} line {line}: no label")
    if classes is not None:
        unknown = [x for x in labels if x not in classes]
        if unknown:
            raise DataError(f"{table.path} line {line}: label {unknown[0]!r} is not one of the "
                            f"{len(classes)} classes of the training set")

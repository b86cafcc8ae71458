"""Careful CSV reading: every complaint names the file and the line."""

from __future__ import annotations

import csv
import io
import logging
from collections.abc import Sequence
from pathlib import Path

from ..errors import DataError

log = logging.getLogger("soundtag")


class Table:
    """A CSV's rows as dicts of stripped strings, with their line numbers.

    A byte-order mark and whitespace around fields are removed with a warning;
    bytes that are not UTF-8, a missing or repeated column, an empty file or a
    duplicate key is a `DataError` naming the line.
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
        records = self._records(raw)
        if not records or not any(records[0][1]):
            raise DataError(f"{path}: empty file, expected a header line")
        self.columns = [self._strip(c, 1) for c in records[0][1]]
        twice = next((c for i, c in enumerate(self.columns) if c and c in self.columns[:i]), None)
        if twice is not None:
            raise DataError(f"{path} line 1: column {twice!r} appears twice in the header")
        self.rows: list[tuple[int, dict[str, str]]] = []
        for line, values in records[1:]:
            if not any(v.strip() for v in values):
                continue
            if len(values) != len(self.columns):
                raise DataError(f"{path} line {line}: {len(values)} fields, the header has {len(self.columns)}")
            self.rows.append((line, {c: self._strip(v, line) for c, v in zip(self.columns, values)}))
        if not self.rows:
            raise DataError(f"{path}: no rows after the header line")

    def _records(self, raw: bytes) -> list[tuple[int, list[str]]]:
        """(line, fields) of each CSV record; any line end (LF, CRLF, CR) is accepted."""
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            line = raw.count(b"\n", 0, e.start) + 1
            raise DataError(f"{self.path} line {line}: not UTF-8 text (byte 0x{raw[e.start]:02x}); "
                            "save the file as UTF-8") from None
        if "\0" in text:
            line = text.count("\n", 0, text.index("\0")) + 1
            raise DataError(f"{self.path} line {line}: contains a NUL byte; not a text CSV")
        reader = csv.reader(io.StringIO(text, newline=""))
        records = []
        try:
            for values in reader:
                records.append((reader.line_num, values))
        except csv.Error as e:
            raise DataError(f"{self.path} line {reader.line_num}: not readable as CSV ({e})") from None
        return records

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
            raise DataError(f"{self.path}: missing column(s) {_listed(missing)} "
                            f"(found: {_listed(self.columns)})")

    def pick(self, candidates: Sequence[str], what: str, required: bool = True) -> str | None:
        """The first of `candidates` that is a column of this table."""
        for c in candidates:
            if c in self.columns:
                return c
        if required:
            raise DataError(f"{self.path}: no {what} column; expected one of {', '.join(candidates)} "
                            f"(found: {_listed(self.columns)}); name it with the column-mapping options")
        return None

    def unique(self, column: str) -> None:
        """Fail on a value of `column` that appears twice."""
        seen: dict[str, int] = {}
        for line, row in self.rows:
            value = row[column]
            if value in seen:
                raise DataError(f"{self.path} line {line}: duplicate {column} {value!r} (first on line {seen[value]})")
            seen[value] = line


def _listed(names: Sequence[str]) -> str:
    """Column names for a one-line message: odd ones (newlines, tabs) quoted."""
    return ", ".join(n if n.isprintable() else repr(n) for n in names)


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

"""Any CSV with a file column and a label (or labels) column, plus an audio root.

Columns are found by common names (ESC-50's `meta/esc50.csv`, UrbanSound8K's
`metadata/UrbanSound8K.csv`, FSD50K-style `fname,labels`) or named explicitly.
Files are looked up under the audio folder, the CSV's folder and its parent,
each also with `audio/` and `fold<k>/` below it.
"""

from __future__ import annotations

from pathlib import Path

from ..errors import DataError
from .base import Dataset, build
from .table import Table, check_labels, split_labels

FILE_COLUMNS = ("fname", "filename", "file", "path", "slice_file_name", "audio")
LABEL_COLUMNS = ("labels", "label", "category", "class", "tags")
FOLD_COLUMNS = ("fold",)
SPLIT_COLUMNS = ("split", "subset")
KNOWN_CSVS = ("meta/esc50.csv", "metadata/UrbanSound8K.csv", "labels.csv", "metadata.csv")


def detect(root: Path) -> bool:
    return root.suffix.lower() == ".csv" or find_csv(root) is not None


def find_csv(root: Path) -> Path | None:
    return next((root / n for n in KNOWN_CSVS if (root / n).is_file()), None)


def read(root: Path, file_column: str | None = None, label_column: str | None = None,
         fold_column: str | None = None, split_column: str | None = None,
         audio_dir: str | Path | None = None, label_sep: str = ",") -> Dataset:
    csv_path = root if root.suffix.lower() == ".csv" else find_csv(root)
    if csv_path is None:
        raise DataError(f"{root}: no CSV found (looked for {', '.join(KNOWN_CSVS)}); pass the CSV file itself")
    table = Table(csv_path, [])
    fcol = _column(table, file_column, FILE_COLUMNS, "file")
    lcol = _column(table, label_column, LABEL_COLUMNS, "label")
    kcol = _column(table, fold_column, FOLD_COLUMNS, "fold", required=False)
    scol = _column(table, split_column, SPLIT_COLUMNS, "split", required=False)
    table.unique(fcol)
    roots = _search_roots(csv_path, audio_dir)
    rows = []
    for line, r in table.rows:
        labels = split_labels(r[lcol], label_sep)
        check_labels(table, line, labels, None)
        fold = _fold(table, line, r[kcol]) if kcol else -1
        split = _split(table, line, r[scol]) if scol else "train"
        rows.append({"file": _resolve(roots, r[fcol], fold), "name": r[fcol], "labels": labels,
                     "split": split, "fold": fold})
    if rows and not any(r["file"].is_file() for r in rows):
        raise DataError(f"{csv_path}: none of its files were found under "
                        f"{', '.join(map(str, roots))}; name the audio folder with --audio-dir")
    multilabel = any(len(r["labels"]) > 1 for r in rows)
    return build(csv_path.parent, "csv", rows, multilabel=multilabel)


def _column(table: Table, given: str | None, candidates: tuple[str, ...], what: str,
            required: bool = True) -> str | None:
    if given is not None:
        table.require(given)
        return given
    return table.pick(candidates, what, required)


def _fold(table: Table, line: int, value: str) -> int:
    try:
        return int(value)
    except ValueError:
        raise DataError(f"{table.path} line {line}: fold {value!r} is not a whole number") from None


def _split(table: Table, line: int, value: str) -> str:
    split = {"train": "train", "training": "train", "test": "test", "eval": "test", "evaluation": "test"}
    if value.lower() not in split:
        raise DataError(f"{table.path} line {line}: split {value!r} is neither train nor test")
    return split[value.lower()]


def _search_roots(csv_path: Path, audio_dir: str | Path | None) -> list[Path]:
    bases = [Path(audio_dir)] if audio_dir else [csv_path.parent, csv_path.parent.parent]
    return [d for b in bases for d in (b, b / "audio")]


def _resolve(roots: list[Path], name: str, fold: int) -> Path:
    for root in roots:
        for path in (root / name, root / f"fold{fold}" / name):
            if path.is_file():
                return path
    return roots[0] / name

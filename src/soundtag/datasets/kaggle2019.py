"""FSDKaggle2019: `train_curated.csv` and `train_noisy.csv` (fname,labels with
labels comma-joined) with folders of the same names, and `test.csv` + `test/`
(labels optional). `sample_submission.csv`, when present, fixes the class order."""

from __future__ import annotations

from pathlib import Path

from .base import Dataset, build
from .table import Table, check_labels, split_labels

SUBSETS = (("train_curated", "train", False), ("train_noisy", "train", True), ("test", "test", False))


def detect(root: Path) -> bool:
    return (root / "train_curated.csv").is_file()


def read(root: Path) -> Dataset:
    parsed = []
    for name, split, noisy in SUBSETS:
        csv_path, folder = root / f"{name}.csv", root / name
        if not csv_path.is_file() or not folder.is_dir():
            continue
        table = Table(csv_path, [])
        table.require("fname", *(("labels",) if split == "train" else ()))
        table.unique("fname")
        for line, r in table.rows:
            labels = split_labels(r["labels"]) if r.get("labels") else None
            parsed.append((table, line, {"file": folder / r["fname"], "name": r["fname"],
                                         "labels": labels, "split": split, "noisy": noisy}))
    classes = _vocabulary(root) or sorted(
        {x for _, _, r in parsed if r["split"] == "train" for x in r["labels"] or ()})
    for table, line, r in parsed:
        if r["split"] == "train" or r["labels"] is not None:
            check_labels(table, line, r["labels"] or [], set(classes))
    return build(root, "kaggle2019", [r for _, _, r in parsed], classes, multilabel=True)


def _vocabulary(root: Path) -> list[str] | None:
    path = root / "sample_submission.csv"
    if not path.is_file():
        return None
    return [c for c in Table(path, []).columns if c != "fname"]

"""FSDKaggle2018: `train.csv` (fname,label,manually_verified) + `audio_train/`,
and a test CSV (fname[,label[,usage]]) + `audio_test/`."""

from __future__ import annotations

from pathlib import Path

from .base import Dataset, build
from .table import Table, check_labels

TEST_CSVS = ("test.csv", "test_post_competition_scoring_clips.csv", "test_post_competition.csv")


def detect(root: Path) -> bool:
    return (root / "train.csv").is_file() and (root / "audio_train").is_dir()


def read(root: Path) -> Dataset:
    train = Table(root / "train.csv", [])
    train.require("fname", "label")
    train.unique("fname")
    rows = []
    for line, r in train.rows:
        check_labels(train, line, [r["label"]] if r["label"] else [], None)
        verified = r.get("manually_verified", "1") in ("1", "True", "true")
        rows.append({"file": root / "audio_train" / r["fname"], "name": r["fname"],
                     "labels": [r["label"]], "split": "train", "verified": verified})
    classes = sorted({r["labels"][0] for r in rows})
    rows += _test_rows(root, set(classes))
    return build(root, "kaggle2018", rows, classes, multilabel=False)


def _test_rows(root: Path, classes: set[str]) -> list[dict]:
    path = next((root / n for n in TEST_CSVS if (root / n).is_file()), None)
    if path is None or not (root / "audio_test").is_dir():
        return []
    test = Table(path, [])
    test.require("fname")
    test.unique("fname")
    rows = []
    for line, r in test.rows:
        label = r.get("label") or None
        if label is not None and label != "None":
            check_labels(test, line, [label], classes)
        labels = [label] if label and label != "None" else None
        rows.append({"file": root / "audio_test" / r["fname"], "name": r["fname"],
                     "labels": labels, "split": "test"})
    return rows

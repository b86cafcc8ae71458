"""Label corrections, the FSDKaggle2019 winner's hand relabelling: `review` lists
the clips whose given labels a run's out-of-fold scores disagree with most, and
writes them as a corrections file for a person to edit; a config's
`corrections:` option applies the edited file to the clips a run trains on.

A corrections file is a CSV with columns `fname`, `old_labels`, `new_labels`
(labels comma-joined); `review` prefills `new_labels` with the given labels and
adds `disagreement` and `predicted` (the run's top classes) for the editor;
training reads the first three and ignores the rest.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pandas as pd

from .clips import ClipTable
from .datasets import Dataset
from .errors import ConfigError, DataError
from .run import Run

log = logging.getLogger("soundtag")
COLUMNS = ("fname", "old_labels", "new_labels")
PREDICTED = 3  # top classes shown beside each reviewed clip


def disagreement(targets: np.ndarray, scores: np.ndarray) -> np.ndarray:
    """Per clip, 1 − the mean score of its given labels (0: the scores agree fully)."""
    given = targets > 0
    return 1 - (scores * given).sum(1) / np.maximum(given.sum(1), 1)


def review(scores: np.ndarray, names: list[str], data: Dataset, classes: list[str], top: int) -> pd.DataFrame:
    """The `top` clips of `names` (scored `scores` over `classes`) whose labels in
    `data` the scores disagree with most, worst first, as a corrections table."""
    row = {name: i for i, name in enumerate(data.names)}
    known = [i for i, name in enumerate(names) if name in row]
    if not known:
        raise DataError(f"none of the run's {len(names)} out-of-fold clips are in {data.root}; "
                        "review the run against the data it was trained on")
    column = {c: j for j, c in enumerate(classes)}
    targets = np.zeros((len(known), len(classes)), np.float32)
    given = [data.labels(row[names[i]]) for i in known]
    for k, labels in enumerate(given):
        targets[k, [column[c] for c in labels if c in column]] = 1
    s = scores[known]
    worse = disagreement(targets, s)
    order = np.argsort(-worse, kind="stable")[:top]
    joined = [",".join(given[k]) for k in order]
    return pd.DataFrame({
        "fname": [names[known[k]] for k in order], "old_labels": joined, "new_labels": joined,
        "disagreement": worse[order].round(4),
        "predicted": [" ".join(f"{classes[j]}:{s[k, j]:.2f}" for j in np.argsort(-s[k])[:PREDICTED]) for k in order],
    })


def review_run(folder: str | Path, data: Dataset, out: str | Path, top: int = 100,
               force: bool = False) -> pd.DataFrame:
    """`review` of a run's out-of-fold scores against `data`, written to `out` (a
    file a person may have edited is kept unless `force`)."""
    if Path(out).exists() and not force:
        raise ConfigError(f"{out} already exists (perhaps edited); pass --force to replace it or --out another file")
    run = Run.open(folder)
    oof, scores = run.read_oof()
    frame = review(scores, oof["fname"].tolist(), data, run.classes, top)
    frame.to_csv(out, index=False)
    return frame


@dataclass(frozen=True)
class Applied:
    """What a corrections file changed in a clip table."""

    file: str
    clips_changed: int
    labels_added: int
    labels_removed: int
    unmatched: int

    def line(self) -> str:
        unmatched = f"; {self.unmatched} row(s) name no training clip" if self.unmatched else ""
        return (f"label corrections {self.file}: labels of {self.clips_changed} clip(s) changed "
                f"({self.labels_added} added, {self.labels_removed} removed){unmatched}")


def read(path: str | Path, classes: list[str], multilabel: bool) -> dict[str, np.ndarray]:
    """fname → new multi-hot target of each row of a corrections file."""
    try:
        frame = pd.read_csv(path, dtype=str, keep_default_na=False)
    except FileNotFoundError:
        raise DataError(f"corrections: {path}: no such file") from None
    except (OSError, pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as e:
        raise DataError(f"corrections: {path}: unreadable ({' '.join(str(e).split())})") from None
    missing = [c for c in COLUMNS if c not in frame.columns]
    if missing:
        raise DataError(f"corrections: {path}: lacks column(s) {', '.join(missing)} (needs {', '.join(COLUMNS)})")
    column = {c: j for j, c in enumerate(classes)}
    out: dict[str, np.ndarray] = {}
    for line, (fname, text) in enumerate(zip(frame["fname"], frame["new_labels"]), start=2):
        labels = [label.strip() for label in text.split(",") if label.strip()]
        unknown = [label for label in labels if label not in column]
        if unknown or not labels or (not multilabel and len(labels) != 1) or fname in out:
            raise DataError(f"corrections: {path} line {line}: " + _problem(fname, labels, unknown, multilabel, out))
        out[fname] = np.zeros(len(classes), np.float32)
        out[fname][[column[label] for label in labels]] = 1
    return out


def _problem(fname: str, labels: list[str], unknown: list[str], multilabel: bool, seen: dict) -> str:
    if fname in seen:
        return f"{fname!r} is corrected twice"
    if unknown:
        return f"label(s) {', '.join(map(repr, unknown))} not among the classes"
    if not labels:
        return f"no new label for {fname!r}"
    return f"{len(labels)} labels for {fname!r}, but the set is single-label"


def apply(table: ClipTable, path: str | Path) -> tuple[ClipTable, Applied]:
    """The table with a corrections file's new labels, and what changed."""
    new = read(path, table.classes, table.multilabel)
    targets = table.targets.copy()
    rows = {name: i for i, name in enumerate(table.names)}
    for fname, target in new.items():
        if fname in rows:
            targets[rows[fname]] = target
    diff = targets - table.targets
    applied = Applied(str(path), int((np.abs(diff).sum(1) > 0).sum()), int((diff > 0).sum()),
                      int((diff < 0).sum()), len(set(new) - set(rows)))
    log.warning(applied.line())
    return replace(table, targets=targets), applied

"""Prediction files: Kaggle submissions, top-k tag tables, thresholded tags.

Unreadable files keep their row: CSV and JSON tables carry the reason in an
`error` field; the Kaggle formats, whose columns are fixed, get a sidecar
`<file>.errors.csv` instead.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from .errors import ConfigError
from .registry import Registry


def top_k(scores: np.ndarray, classes: list[str], k: int) -> list[list[tuple[str, float]]]:
    """Each row's k best (label, score) pairs, best first; [] for a NaN row."""
    order = np.argsort(-np.nan_to_num(scores, nan=-np.inf), axis=1)[:, :k]
    return [[] if np.isnan(row).all() else [(classes[j], float(row[j])) for j in idx]
            for row, idx in zip(scores, order)]


def above(scores: np.ndarray, classes: list[str], thresholds: np.ndarray) -> list[list[str]]:
    """Each row's labels scoring at least their class threshold."""
    return [[classes[j] for j in np.flatnonzero(row >= thresholds)] for row in np.nan_to_num(scores, nan=-1)]


@dataclass(frozen=True)
class Predictions:
    """What a writer gets: file names, their scores, the class names and the rest of `write`'s options."""

    names: list[str]
    scores: np.ndarray
    classes: list[str]
    errors: dict[int, str]
    k: int
    thresholds: np.ndarray | None

    def error_of(self) -> list[str]:
        """Each row's reason for having no scores, "" where it has them."""
        return [self.errors.get(i, "") for i in range(len(self.names))]


FORMATS: Registry[Callable[[Path, Predictions], None]] = Registry("output format")


@FORMATS.register("kaggle2018")
def _kaggle2018(path: Path, p: Predictions) -> None:
    labels = [" ".join(c for c, _ in row) for row in top_k(p.scores, p.classes, 3)]
    pd.DataFrame({"fname": p.names, "label": labels}).to_csv(path, index=False)
    _errors_beside(path, p)


@FORMATS.register("kaggle2019")
def _kaggle2019(path: Path, p: Predictions) -> None:
    table = pd.DataFrame(p.scores, columns=p.classes)
    table.insert(0, "fname", p.names)
    table.to_csv(path, index=False, float_format="%.6f")
    _errors_beside(path, p)


@FORMATS.register("csv")
def _csv(path: Path, p: Predictions) -> None:
    table: dict[str, list] = {"fname": p.names}
    best = top_k(p.scores, p.classes, p.k)
    for r in range(min(p.k, len(p.classes))):
        table[f"label_{r + 1}"] = [row[r][0] if row else "" for row in best]
        table[f"score_{r + 1}"] = [round(row[r][1], 6) if row else np.nan for row in best]
    table["error"] = p.error_of()
    pd.DataFrame(table).to_csv(path, index=False)


@FORMATS.register("json")
def _json(path: Path, p: Predictions) -> None:
    rows = [{"fname": n, "tags": [{"label": c, "score": round(s, 6)} for c, s in row], "error": e or None}
            for n, row, e in zip(p.names, top_k(p.scores, p.classes, p.k), p.error_of())]
    path.write_text(json.dumps(rows, indent=1))


@FORMATS.register("tags")
def _tags(path: Path, p: Predictions) -> None:
    if p.thresholds is None:
        raise ConfigError("the tags format needs per-class thresholds (tuned on out-of-fold scores)")
    labels = [",".join(row) for row in above(p.scores, p.classes, p.thresholds)]
    pd.DataFrame({"fname": p.names, "labels": labels, "error": p.error_of()}).to_csv(path, index=False)


def _errors_beside(path: Path, p: Predictions) -> None:
    """The reasons for unreadable files in `<file>.errors.csv`: the Kaggle columns are fixed."""
    if p.errors:
        pd.DataFrame({"fname": [p.names[i] for i in p.errors], "error": list(p.errors.values())}).to_csv(
            path.with_name(path.name + ".errors.csv"), index=False)


def write(path: str | Path, fmt: str, names: list[str], scores: np.ndarray, classes: list[str],
          errors: dict[int, str], k: int = 3, thresholds: np.ndarray | None = None) -> Path:
    """Write predictions for `names` in format `fmt`."""
    writer = FORMATS.get(fmt)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    writer(path, Predictions(names, scores, classes, errors, k, thresholds))
    return path

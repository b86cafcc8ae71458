"""Prediction files: Kaggle submissions, top-k tag tables, thresholded tags.

Unreadable files keep their row: CSV and JSON tables carry the reason in an
`error` field; the Kaggle formats, whose columns are fixed, get a sidecar
`<file>.errors.csv` instead.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd

from .errors import ConfigError

FORMATS = ("kaggle2018", "kaggle2019", "csv", "json", "tags")


def top_k(scores: np.ndarray, classes: list[str], k: int) -> list[list[tuple[str, float]]]:
    """Each row's k best (label, score) pairs, best first; [] for a NaN row."""
    order = np.argsort(-np.nan_to_num(scores, nan=-np.inf), axis=1)[:, :k]
    return [[] if np.isnan(row).all() else [(classes[j], float(row[j])) for j in idx]
            for row, idx in zip(scores, order)]


def above(scores: np.ndarray, classes: list[str], thresholds: np.ndarray) -> list[list[str]]:
    """Each row's labels scoring at least their class threshold."""
    return [[classes[j] for j in np.flatnonzero(row >= thresholds)] for row in np.nan_to_num(scores, nan=-1)]


def write(path: str | Path, fmt: str, names: list[str], scores: np.ndarray, classes: list[str],
          errors: dict[int, str], k: int = 3, thresholds: np.ndarray | None = None) -> Path:
    """Write predictions for `names` in format `fmt`."""
    if fmt not in FORMATS:
        raise ConfigError(f"unknown output format {fmt!r}; valid: {', '.join(FORMATS)}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    error_of = [errors.get(i, "") for i in range(len(names))]
    if fmt == "kaggle2018":
        labels = [" ".join(c for c, _ in row) for row in top_k(scores, classes, 3)]
        pd.DataFrame({"fname": names, "label": labels}).to_csv(path, index=False)
    elif fmt == "kaggle2019":
        table = pd.DataFrame(scores, columns=classes)
        table.insert(0, "fname", names)
        table.to_csv(path, index=False, float_format="%.6f")
    elif fmt == "json":
        rows = [{"fname": n, "tags": [{"label": c, "score": round(s, 6)} for c, s in row], "error": e or None}
                for n, row, e in zip(names, top_k(scores, classes, k), error_of)]
        path.write_text(json.dumps(rows, indent=1))
    elif fmt == "csv":
        table = {"fname": names}
        best = top_k(scores, classes, k)
        for r in range(min(k, len(classes))):
            table[f"label_{r + 1}"] = [row[r][0] if row else "" for row in best]
            table[f"score_{r + 1}"] = [round(row[r][1], 6) if row else np.nan for row in best]
        table["error"] = error_of
        pd.DataFrame(table).to_csv(path, index=False)
    else:
        if thresholds is None:
            raise ConfigError("the tags format needs per-class thresholds (tuned on out-of-fold scores)")
        labels = [",".join(row) for row in above(scores, classes, thresholds)]
        pd.DataFrame({"fname": names, "labels": labels, "error": error_of}).to_csv(path, index=False)
    if errors and fmt.startswith("kaggle"):
        pd.DataFrame({"fname": [names[i] for i in errors], "error": list(errors.values())}).to_csv(
            path.with_name(path.name + ".errors.csv"), index=False)
    return path

"""Cross-validation folds: stratified K-fold (iterative stratification for
multi-label sets) or the dataset's own folds."""

from __future__ import annotations

import numpy as np
from iterstrat.ml_stratifiers import MultilabelStratifiedKFold
from sklearn.model_selection import StratifiedKFold

from .clips import ClipTable
from .errors import DataError


def assign_folds(table: ClipTable, folds: int | str, seed: int = 0) -> np.ndarray:
    """A fold number per clip of a training table; -1 for clips that are never
    held out (noisy, pseudo-labelled or selected clips: their labels are not
    trusted for validation), unless the table holds no others."""
    candidates = table.held_out_candidates
    if not candidates.any():  # e.g. a noisy-only stage: its own labels are all there is
        candidates = np.ones(len(table), bool)
    if folds == "own":
        if (table.fold < 0).all():
            raise DataError("the dataset has no fold column; use --folds K instead")
        return np.where(candidates, table.fold, -1)
    out = np.full(len(table), -1, np.int64)
    held = np.flatnonzero(candidates)
    targets = table.targets[held]
    _check_enough(table, targets, int(folds))
    if table.multilabel:
        splitter = MultilabelStratifiedKFold(n_splits=int(folds), shuffle=True, random_state=seed)
        parts = splitter.split(held, targets)
    else:
        splitter = StratifiedKFold(n_splits=int(folds), shuffle=True, random_state=seed)
        parts = splitter.split(held, targets.argmax(1))
    for k, (_, val) in enumerate(parts):
        out[held[val]] = k
    return out


def fold_ids(fold: np.ndarray) -> list[int]:
    """The folds present, in order."""
    return sorted(int(k) for k in np.unique(fold) if k >= 0)


def _check_enough(table: ClipTable, targets: np.ndarray, folds: int) -> None:
    counts = targets.sum(0).astype(int)
    few = [f"{c} ({n})" for c, n in zip(table.classes, counts) if n < folds]
    if few:
        raise DataError(f"{len(few)} class(es) have fewer clips than the {folds} folds asked for: "
                        f"{', '.join(few[:10])}{' …' if len(few) > 10 else ''}; use fewer folds "
                        "or add clips")

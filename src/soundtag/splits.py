"""Cross-validation folds: stratified K-fold (iterative stratification for
multi-label sets) or the dataset's own folds."""

from __future__ import annotations

import numpy as np
from iterstrat.ml_stratifiers import MultilabelStratifiedKFold
from sklearn.model_selection import StratifiedKFold

from .datasets import Dataset
from .errors import DataError


def assign_folds(dataset: Dataset, folds: int | str, seed: int = 0) -> np.ndarray:
    """A fold number per clip of a training set; -1 for clips that are never
    held out (noisy clips: their labels are not trusted for validation)."""
    if folds == "own":
        if (dataset.fold < 0).all():
            raise DataError(f"{dataset.root}: the dataset has no fold column; use --folds K instead")
        return np.where(dataset.noisy, -1, dataset.fold)
    out = np.full(len(dataset), -1, np.int64)
    held = np.flatnonzero(~dataset.noisy)
    targets = dataset.targets[held]
    _check_enough(dataset, targets, int(folds))
    if dataset.multilabel:
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


def _check_enough(dataset: Dataset, targets: np.ndarray, folds: int) -> None:
    counts = targets.sum(0).astype(int)
    few = [f"{c} ({n})" for c, n in zip(dataset.classes, counts) if n < folds]
    if few:
        raise DataError(f"{len(few)} class(es) have fewer clips than the {folds} folds asked for: "
                        f"{', '.join(few[:10])}{' …' if len(few) > 10 else ''}; use fewer folds "
                        "or add clips")

"""Cross-validation folds: stratified K-fold (iterative stratification for
multi-label sets) or the dataset's own folds."""

from __future__ import annotations

import logging

import numpy as np
from iterstrat.ml_stratifiers import MultilabelStratifiedKFold, MultilabelStratifiedShuffleSplit
from sklearn.model_selection import StratifiedKFold

from .clips import ClipTable
from .errors import DataError

log = logging.getLogger("soundtag")


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
    held = np.flatnonzero(candidates & ~_rare(table, candidates, int(folds)))
    targets = table.targets[held]
    if len(held) < int(folds):
        raise DataError(f"{len(held)} clip(s) can be held out, fewer than the {folds} folds asked for; "
                        "use fewer folds or add clips")
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


def _rare(table: ClipTable, candidates: np.ndarray, folds: int) -> np.ndarray:
    """Clips of a class with fewer candidate clips than folds: they stay in
    every fold's training clips (a warning names the classes)."""
    counts = table.targets[candidates].sum(0).astype(int)
    rare = (counts > 0) & (counts < folds)
    if rare.any():
        names = [f"{c} ({n})" for c, n, r in zip(table.classes, counts, rare) if r]
        log.warning(f"{len(names)} class(es) have fewer clips than the {folds} folds: {', '.join(names[:10])}"
                    f"{' …' if len(names) > 10 else ''}; their clips are trained on in every fold, never held out")
    return table.targets[:, rare].any(1)


def inner_split(table: ClipTable, training: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """Mask of the clips, among a fold's `training` clips, held out to pick its
    epoch: a stratified `fraction` of those whose labels are trusted. Classes
    with fewer than two such clips keep them all in training."""
    pool = np.flatnonzero(training & table.held_out_candidates)
    if not len(pool):  # any clip but an augmentation copy
        pool = np.flatnonzero(training & ~table.is_copy)
    targets = table.targets[pool]
    out = np.zeros(len(table), bool)
    if table.multilabel:
        take = max(1, round(fraction * len(pool)))
        if len(pool) < 2 or take >= len(pool):
            raise DataError(f"only {len(pool)} training clip(s): too few to hold some out for selection; "
                            "use selection: last")
        splitter = MultilabelStratifiedShuffleSplit(n_splits=1, test_size=take, random_state=seed)
        _, picked = next(splitter.split(pool, targets))
        out[pool[picked]] = True
        return out
    rng = np.random.default_rng(seed)
    labels = targets.argmax(1)
    for c in np.unique(labels):
        members = pool[labels == c]
        if len(members) >= 2:
            out[rng.choice(members, max(1, round(fraction * len(members))), replace=False)] = True
    if not out.any():
        raise DataError("no class has two training clips to hold one out for selection; use selection: last")
    return out

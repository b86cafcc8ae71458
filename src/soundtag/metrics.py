"""Evaluation metrics for audio taggers (numpy only).

All functions take ``truth`` (0/1 or bool, shape ``[n_clips, n_classes]``) and
``scores`` (float, same shape; higher means "more likely present").

Ties in ``scores`` are handled *pessimistically* everywhere: the rank of a label
is the number of labels scored ``>=`` it, so a label tied with others is placed
at the end of its tie group.  This is the convention of sklearn's
``label_ranking_average_precision_score`` (and of the sklearn-based lwlrap in
the DCASE2019 Task 2 reference notebook).  The notebook's pure-numpy lwlrap
instead breaks ties by ``argsort`` order, i.e. arbitrarily; on tie-free scores
all of these agree exactly.  A consequence of the pessimistic convention is that
a model emitting constant scores earns no credit from ranking ties.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from sklearn.metrics import precision_recall_curve

__all__ = [
    "lwlrap_per_class",
    "lwlrap",
    "lwlrap_per_clip",
    "map_at_k",
    "top_k_accuracy",
    "average_precision_per_class",
    "evaluate",
]


def _validate(truth: Any, scores: Any) -> tuple[np.ndarray, np.ndarray]:
    """Check shapes/values and return ``(truth as bool, scores as float64)``."""
    truth = np.asarray(truth)
    scores = np.asarray(scores)
    if truth.ndim != 2 or scores.ndim != 2:
        raise ValueError(
            "truth and scores must be 2-D [n_clips, n_classes]; got "
            f"truth.ndim={truth.ndim}, scores.ndim={scores.ndim}"
        )
    if truth.shape != scores.shape:
        raise ValueError(
            f"truth and scores shapes differ: {truth.shape} vs {scores.shape}"
        )
    if truth.shape[1] == 0:
        raise ValueError("truth and scores must have at least one class column")
    if truth.dtype != np.bool_:
        if not np.issubdtype(truth.dtype, np.number):
            raise ValueError(f"truth must be bool or numeric 0/1, got dtype {truth.dtype}")
        if not np.all((truth == 0) | (truth == 1)):
            raise ValueError("truth must contain only 0/1 (or bool) values")
        truth = truth == 1
    if not (
        np.issubdtype(scores.dtype, np.floating)
        or np.issubdtype(scores.dtype, np.integer)
        or scores.dtype == np.bool_
    ):
        raise ValueError(f"scores must be real numbers, got dtype {scores.dtype}")
    scores = scores.astype(np.float64, copy=False)
    if np.isnan(scores).any():
        raise ValueError("scores contain NaN")
    return truth, scores


def _pessimistic_precisions(truth: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-element ranking precision along axis 1, ties ranked pessimistically.

    For every element ``(i, j)`` returns ``rank[i, j] = #{l : scores[i, l] >=
    scores[i, j]}`` and ``hits[i, j] = #{l : truth[i, l] and scores[i, l] >=
    scores[i, j]}``.  Vectorised: O(n * C log C) time, O(n * C) memory.
    """
    n, c = scores.shape
    if n == 0:
        z = np.zeros((0, c), dtype=np.int64)
        return z, z
    order = np.argsort(-scores, axis=1, kind="stable")  # descending
    s_sorted = np.take_along_axis(scores, order, axis=1)
    cum_hits = np.cumsum(np.take_along_axis(truth, order, axis=1), axis=1)
    # Position p ends a tie group if the next sorted score differs (or p is last).
    is_end = np.ones((n, c), dtype=bool)
    is_end[:, :-1] = s_sorted[:, :-1] != s_sorted[:, 1:]
    # For each position, index of the end of its tie group: the first end at or
    # after it, i.e. a reversed running minimum over end indices.
    end_idx = np.where(is_end, np.arange(c), c)
    end_idx = np.minimum.accumulate(end_idx[:, ::-1], axis=1)[:, ::-1]
    rank_sorted = end_idx + 1
    hits_sorted = np.take_along_axis(cum_hits, end_idx, axis=1)
    # Scatter back from sorted order to original column order.
    rank = np.empty((n, c), dtype=np.int64)
    hits = np.empty((n, c), dtype=np.int64)
    np.put_along_axis(rank, order, rank_sorted, axis=1)
    np.put_along_axis(hits, order, hits_sorted, axis=1)
    return hits, rank


def lwlrap_per_class(truth: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-class label-weighted label-ranking average precision (DCASE2019 Task 2).

    For each clip and each of its positive labels, precision = (positive labels
    of the clip scored >= this label) / (all labels of the clip scored >= this
    label), i.e. the label's 1-based rank with ties ranked pessimistically.  A
    class's lwlrap is the mean of these precisions over its positive labels.

    Returns ``(per_class_lwlrap, weight)`` where ``weight[c]`` is the fraction of
    all positive labels that belong to class ``c`` (sums to 1).  Clips with no
    positive labels contribute nothing (dropped).  A class with no positives gets
    lwlrap 0 and weight 0; if ``truth`` has no positives at all every weight is 0.
    """
    truth, scores = _validate(truth, scores)
    hits, rank = _pessimistic_precisions(truth, scores)
    precision = np.where(truth, hits / np.maximum(rank, 1), 0.0)
    n_pos = truth.sum(axis=0)
    per_class = np.divide(
        precision.sum(axis=0), n_pos, out=np.zeros(truth.shape[1]), where=n_pos > 0
    )
    total = n_pos.sum()
    weight = n_pos / total if total > 0 else np.zeros(truth.shape[1])
    return per_class, weight.astype(np.float64)


def lwlrap(truth: np.ndarray, scores: np.ndarray) -> float:
    """Overall lwlrap = ``sum(per_class * weight)``; NaN if there are no positive labels.

    Equals ``sklearn.metrics.label_ranking_average_precision_score(truth, scores,
    sample_weight=truth.sum(1))`` (the same tie convention, so also with ties).
    """
    per_class, weight = lwlrap_per_class(truth, scores)
    if weight.sum() == 0:
        return float("nan")
    return float(np.sum(per_class * weight))


def lwlrap_per_clip(truth: np.ndarray, scores: np.ndarray) -> np.ndarray:
    """Each clip's own lwlrap (its label-ranking average precision): the mean
    precision at the ranks of its positive labels; 1 when they are its top
    scores; NaN for a clip without labels."""
    truth, scores = _validate(truth, scores)
    hits, rank = _pessimistic_precisions(truth, scores)
    precision = np.where(truth, hits / np.maximum(rank, 1), 0.0)
    n_pos = truth.sum(axis=1)
    return np.divide(precision.sum(axis=1), n_pos, out=np.full(len(n_pos), np.nan), where=n_pos > 0)


def _check_k(k: int) -> None:
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
        raise ValueError(f"k must be a positive integer, got {k!r}")


def _labelled_clips(truth: Any, scores: Any, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Checked inputs without the clips that have no true label."""
    _check_k(k)
    truth, scores = _validate(truth, scores)
    keep = truth.any(axis=1)
    return truth[keep], scores[keep]


def map_at_k(truth: np.ndarray, scores: np.ndarray, k: int = 3) -> float:
    """Mean average precision at ``k`` (FSDKaggle2018 "MAP@3" for ``k=3``).

    Single true label per clip: ``1/rank`` if the label ranks within the top
    ``k``, else 0.  Several true labels: the standard MAP@k generalisation
    ``sum over true labels ranked <= k of precision@rank / min(k, n_true)``.
    Ranks use the pessimistic tie convention (see module docstring).  Clips with
    no true labels are dropped; NaN if no clip remains.
    """
    truth, scores = _labelled_clips(truth, scores, k)
    if truth.shape[0] == 0:
        return float("nan")
    hits, rank = _pessimistic_precisions(truth, scores)
    counted = truth & (rank <= k)
    ap_sum = np.where(counted, hits / np.maximum(rank, 1), 0.0).sum(axis=1)
    ap = ap_sum / np.minimum(k, truth.sum(axis=1))
    return float(ap.mean())


def top_k_accuracy(truth: np.ndarray, scores: np.ndarray, k: int = 1) -> float:
    """Fraction of clips with at least one true label among the top ``k`` scores.

    A true label counts as within the top ``k`` if its pessimistic rank (number
    of labels scored >= it) is <= k.  Clips with no true labels are dropped; NaN
    if no clip remains.
    """
    truth, scores = _labelled_clips(truth, scores, k)
    if truth.shape[0] == 0:
        return float("nan")
    _, rank = _pessimistic_precisions(truth, scores)
    return float((truth & (rank <= k)).any(axis=1).mean())


def average_precision_per_class(truth: np.ndarray, scores: np.ndarray) -> np.ndarray:
    """Per-class average precision (area under the step precision-recall curve).

    Matches ``sklearn.metrics.average_precision_score`` column by column, ties
    included (a tie group is one threshold).  NaN for classes with no positives.
    """
    truth, scores = _validate(truth, scores)
    # AP of a class = mean over its positive clips of the pessimistic precision
    # computed down the column, i.e. the same ranking routine on the transpose.
    hits, rank = _pessimistic_precisions(truth.T, scores.T)
    precision = np.where(truth.T, hits / np.maximum(rank, 1), 0.0)
    n_pos = truth.sum(axis=0)
    ap = np.full(truth.shape[1], np.nan)
    np.divide(precision.sum(axis=1), n_pos, out=ap, where=n_pos > 0)
    return ap


def _to_float(x: float) -> float | None:
    x = float(x)
    return None if math.isnan(x) else x


def evaluate(
    truth: np.ndarray, scores: np.ndarray, classes: list[str], multilabel: bool
) -> dict[str, Any]:
    """All metrics in one JSON-serialisable dict (plain floats, NaN -> None).

    Keys: ``"lwlrap"``, ``"map@3"``, ``"accuracy"`` (top-1) and ``"per_class"``
    mapping each class name to ``{"lwlrap", "ap", "positives"}``.  A class with no
    positives has ``lwlrap`` 0.0 and ``ap`` None.  With ``multilabel=False`` every
    clip must have at most one true label (ValueError otherwise).
    """
    truth, scores = _validate(truth, scores)
    classes = list(classes)
    if len(classes) != truth.shape[1]:
        raise ValueError(
            f"got {len(classes)} class names for {truth.shape[1]} score columns"
        )
    if len(set(classes)) != len(classes):
        raise ValueError("class names must be unique")
    if not multilabel and (truth.sum(axis=1) > 1).any():
        n_bad = int((truth.sum(axis=1) > 1).sum())
        raise ValueError(
            f"multilabel=False but {n_bad} clip(s) have more than one true label"
        )
    per_class, _ = lwlrap_per_class(truth, scores)
    ap = average_precision_per_class(truth, scores)
    positives = truth.sum(axis=0)
    return {
        "lwlrap": _to_float(lwlrap(truth, scores)),
        "map@3": _to_float(map_at_k(truth, scores, k=3)),
        "accuracy": _to_float(top_k_accuracy(truth, scores, k=1)),
        "per_class": {
            name: {
                "lwlrap": _to_float(per_class[i]),
                "ap": _to_float(ap[i]),
                "positives": int(positives[i]),
            }
            for i, name in enumerate(classes)
        },
    }


def tune_thresholds(truth: np.ndarray, scores: np.ndarray) -> np.ndarray:
    """Per-class score thresholds that maximise each class's F1 on held-out
    scores (0.5 for a class without positives)."""
    truth, scores = _validate(truth, scores)
    out = np.full(truth.shape[1], 0.5)
    for j in range(truth.shape[1]):
        if not truth[:, j].any():
            continue
        precision, recall, cut = precision_recall_curve(truth[:, j], scores[:, j])
        f1 = 2 * precision[:-1] * recall[:-1] / np.maximum(precision[:-1] + recall[:-1], 1e-12)
        out[j] = float(cut[np.argmax(f1)])
    return out

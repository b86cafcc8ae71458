"""Tests for soundtag.metrics."""

from __future__ import annotations

import json

import numpy as np
import pytest
from sklearn.metrics import (
    average_precision_score,
    label_ranking_average_precision_score,
    top_k_accuracy_score,
)

from soundtag.metrics import (
    average_precision_per_class,
    evaluate,
    lwlrap,
    lwlrap_per_class,
    map_at_k,
    top_k_accuracy,
)


def _random_multilabel(seed: int, n: int, c: int, ties: bool = False):
    rng = np.random.default_rng(seed)
    truth = rng.random((n, c)) < rng.uniform(0.05, 0.5)
    # Make sure every clip has at least one label, except a few left empty.
    empty = rng.random(n) < 0.1
    truth[np.arange(n), rng.integers(0, c, n)] = True
    truth[empty] = False
    scores = rng.random((n, c))
    if ties:
        scores = np.round(scores * 4) / 4  # only 5 distinct values -> many ties
    return truth, scores


def _sklearn_lwlrap(truth, scores):
    w = truth.sum(1)
    keep = w > 0
    return label_ranking_average_precision_score(truth[keep], scores[keep], sample_weight=w[keep])


def _naive_precisions(truth, scores):
    """Loop reference: precision of each positive label, ties ranked pessimistically."""
    out = np.zeros(truth.shape)
    for i in range(truth.shape[0]):
        for j in np.flatnonzero(truth[i]):
            above = scores[i] >= scores[i, j]
            out[i, j] = (above & truth[i]).sum() / above.sum()
    return out


# --------------------------------------------------------------------- lwlrap


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("shape", [(1, 2), (7, 3), (50, 10), (200, 41), (30, 80)])
def test_lwlrap_matches_sklearn_tie_free(seed, shape):
    truth, scores = _random_multilabel(seed, *shape)
    if truth.sum() == 0:
        truth[0, 0] = True
    assert len(np.unique(scores)) == scores.size  # tie-free
    assert lwlrap(truth, scores) == pytest.approx(_sklearn_lwlrap(truth, scores), abs=1e-12)


@pytest.mark.parametrize("seed", range(5))
def test_lwlrap_matches_sklearn_and_naive_with_ties(seed):
    # sklearn's LRAP counts labels scored >= a label too, so it agrees with ties.
    truth, scores = _random_multilabel(seed, 60, 12, ties=True)
    assert lwlrap(truth, scores) == pytest.approx(_sklearn_lwlrap(truth, scores), abs=1e-12)
    prec = _naive_precisions(truth, scores)
    n_pos = truth.sum(0)
    expected = np.divide(prec.sum(0), n_pos, out=np.zeros(truth.shape[1]), where=n_pos > 0)
    per_class, weight = lwlrap_per_class(truth, scores)
    np.testing.assert_allclose(per_class, expected, atol=1e-12)
    np.testing.assert_allclose(weight, n_pos / n_pos.sum(), atol=1e-12)


def test_lwlrap_hand_case_with_ties():
    truth = np.array(
        [
            [1, 0, 1, 0],
            [0, 1, 0, 0],
            [0, 0, 0, 0],  # no labels: dropped
            [1, 0, 0, 1],
        ]
    )
    scores = np.array(
        [
            [0.8, 0.8, 0.3, 0.1],
            [0.2, 0.2, 0.2, 0.2],
            [0.9, 0.1, 0.1, 0.1],
            [0.1, 0.9, 0.4, 0.4],
        ]
    )
    # clip 0, class 0: labels scored >= 0.8 are {0, 1} -> rank 2, positives {0} -> 1/2
    # clip 0, class 2: labels scored >= 0.3 are {0, 1, 2} -> rank 3, positives {0, 2} -> 2/3
    # clip 1, class 1: all four tied -> rank 4, positives {1} -> 1/4
    # clip 3, class 0: all labels >= 0.1 -> rank 4, positives {0, 3} -> 2/4 = 1/2
    # clip 3, class 3: labels >= 0.4 are {1, 2, 3} -> rank 3, positives {3} -> 1/3
    # per class: c0 = (1/2 + 1/2) / 2 = 1/2, c1 = 1/4, c2 = 2/3, c3 = 1/3
    # positives per class 2, 1, 1, 1 (total 5) -> weights 0.4, 0.2, 0.2, 0.2
    # lwlrap = 0.4*0.5 + 0.2*0.25 + 0.2*2/3 + 0.2*1/3 = 0.45
    #        = mean of the 5 label precisions (1/2 + 2/3 + 1/4 + 1/2 + 1/3) / 5
    per_class, weight = lwlrap_per_class(truth, scores)
    np.testing.assert_allclose(per_class, [0.5, 0.25, 2 / 3, 1 / 3])
    np.testing.assert_allclose(weight, [0.4, 0.2, 0.2, 0.2])
    assert lwlrap(truth, scores) == pytest.approx(0.45)
    assert lwlrap(truth, scores) == pytest.approx(_sklearn_lwlrap(truth, scores))


def test_lwlrap_perfect_and_worst():
    truth = np.array([[1, 1, 0, 0], [0, 0, 1, 0], [1, 1, 1, 1]], dtype=bool)
    perfect = truth + np.arange(4) * 0.01  # positives all above negatives
    assert lwlrap(truth, perfect) == pytest.approx(1.0)
    # Worst single-label ranking: true label scored lowest -> rank C -> 1/C.
    c = 5
    truth1 = np.eye(c)
    assert lwlrap(truth1, 1.0 - truth1) == pytest.approx(1 / c)
    # Worst two-label ranking over 4 classes: positives at ranks 3 and 4.
    # label 1 (score 0.1): rank 3, 1 hit -> 1/3; label 0 (score 0): rank 4, 2 hits -> 1/2
    # lwlrap = (1/3 + 1/2) / 2 = 5/12
    assert lwlrap([[1, 1, 0, 0]], [[0.0, 0.1, 0.5, 0.9]]) == pytest.approx(5 / 12)


def test_lwlrap_constant_scores_get_no_tie_credit():
    truth = np.eye(4)
    # Every label tied -> pessimistic rank 4 -> precision 1/4.
    assert lwlrap(truth, np.zeros((4, 4))) == pytest.approx(0.25)


def test_clips_without_labels_are_dropped():
    truth, scores = _random_multilabel(3, 40, 6)
    truth = truth[truth.any(1)]
    scores = scores[: len(truth)]
    base_pc, base_w = lwlrap_per_class(truth, scores)
    rng = np.random.default_rng(0)
    truth2 = np.vstack([truth, np.zeros((10, 6), dtype=bool)])
    scores2 = np.vstack([scores, rng.random((10, 6))])
    pc, w = lwlrap_per_class(truth2, scores2)
    np.testing.assert_allclose(pc, base_pc)
    np.testing.assert_allclose(w, base_w)
    assert map_at_k(truth2, scores2) == pytest.approx(map_at_k(truth, scores))
    assert top_k_accuracy(truth2, scores2) == pytest.approx(top_k_accuracy(truth, scores))


@pytest.mark.parametrize("seed", range(4))
def test_weights_sum_to_one_and_weighted_sum_is_overall(seed):
    truth, scores = _random_multilabel(seed, 80, 15, ties=seed % 2 == 1)
    truth[:, 3] = False  # a class with no positives
    per_class, weight = lwlrap_per_class(truth, scores)
    assert weight.sum() == pytest.approx(1.0)
    assert per_class[3] == 0.0 and weight[3] == 0.0
    assert np.all((per_class >= 0) & (per_class <= 1))
    assert float(np.sum(per_class * weight)) == pytest.approx(lwlrap(truth, scores))


def test_lwlrap_no_positives_at_all():
    per_class, weight = lwlrap_per_class(np.zeros((3, 4)), np.random.default_rng(0).random((3, 4)))
    assert np.all(per_class == 0) and np.all(weight == 0)
    assert np.isnan(lwlrap(np.zeros((3, 4)), np.zeros((3, 4))))


def test_accepts_float_truth_and_int_scores():
    truth = np.array([[1.0, 0.0, 0.0], [0.0, 0.0, 1.0]])
    scores = np.array([[3, 2, 1], [3, 2, 1]])
    # clip 0: rank 1 -> 1; clip 1: rank 3 -> 1/3; mean = 2/3
    assert lwlrap(truth, scores) == pytest.approx(2 / 3)


# -------------------------------------------------------------------- map@k


def test_map_at_3_single_label_hand_cases():
    scores = np.array([[0.4, 0.3, 0.2, 0.1]])
    for true_idx, expected in [(0, 1.0), (1, 0.5), (2, 1 / 3), (3, 0.0)]:
        truth = np.zeros((1, 4))
        truth[0, true_idx] = 1
        assert map_at_k(truth, scores, k=3) == pytest.approx(expected)
    # All four together: (1 + 1/2 + 1/3 + 0) / 4
    truth = np.eye(4)
    assert map_at_k(truth, np.tile(scores, (4, 1)), k=3) == pytest.approx((1 + 0.5 + 1 / 3) / 4)


def test_map_at_k_multilabel_and_ties():
    # Positives at ranks 1, 3, 5: precision@1 = 1, precision@3 = 2/3, rank 5 > k.
    # AP@3 = (1 + 2/3) / min(3, 3) = 5/9
    truth = [[1, 0, 1, 0, 1]]
    scores = [[0.9, 0.8, 0.7, 0.6, 0.5]]
    assert map_at_k(truth, scores, k=3) == pytest.approx(5 / 9)
    # Two positives at ranks 1 and 2, k=3: (1 + 1) / min(3, 2) = 1
    assert map_at_k([[1, 1, 0, 0]], [[0.9, 0.8, 0.1, 0.0]], k=3) == pytest.approx(1.0)
    # Tie: true label tied with one other at the top -> pessimistic rank 2 -> 1/2
    assert map_at_k([[0, 1, 0, 0]], [[0.5, 0.5, 0.1, 0.1]], k=3) == pytest.approx(0.5)


def test_map_at_k_equals_lwlrap_for_single_label_with_k_all():
    rng = np.random.default_rng(1)
    n, c = 100, 9
    truth = np.eye(c)[rng.integers(0, c, n)]
    scores = rng.random((n, c))
    assert map_at_k(truth, scores, k=c) == pytest.approx(lwlrap(truth, scores))


# ------------------------------------------------------------ top-k accuracy


def test_top_k_accuracy_hand_case():
    scores = np.tile([0.4, 0.3, 0.2, 0.1], (4, 1))
    truth = np.eye(4)  # true labels at ranks 1, 2, 3, 4
    for k, expected in [(1, 0.25), (2, 0.5), (3, 0.75), (4, 1.0)]:
        assert top_k_accuracy(truth, scores, k=k) == pytest.approx(expected)
    # Multi-label: counts if any true label is in the top k.
    assert top_k_accuracy([[0, 1, 0, 1]], [[0.9, 0.1, 0.2, 0.8]], k=1) == 0.0
    assert top_k_accuracy([[0, 1, 0, 1]], [[0.9, 0.1, 0.2, 0.8]], k=2) == 1.0


@pytest.mark.parametrize("k", [1, 2, 3])
def test_top_k_accuracy_matches_sklearn(k):
    rng = np.random.default_rng(k)
    n, c = 300, 7
    labels = rng.integers(0, c, n)
    scores = rng.random((n, c))
    expected = top_k_accuracy_score(labels, scores, k=k, labels=np.arange(c))
    assert top_k_accuracy(np.eye(c)[labels], scores, k=k) == pytest.approx(expected)


# ------------------------------------------------------------------------ AP


@pytest.mark.parametrize("ties", [False, True])
def test_average_precision_matches_sklearn(ties):
    truth, scores = _random_multilabel(7, 120, 10, ties=ties)
    truth[:, 4] = False
    ap = average_precision_per_class(truth, scores)
    assert np.isnan(ap[4])
    for j in range(truth.shape[1]):
        if j == 4:
            continue
        assert ap[j] == pytest.approx(average_precision_score(truth[:, j], scores[:, j]))


def test_average_precision_hand_case_with_tie():
    # Column truth [1, 0, 1, 0], scores [.9, .9, .5, .1]:
    # positive clip 0: clips scored >= .9 are {0, 1} -> precision 1/2
    # positive clip 2: clips scored >= .5 are {0, 1, 2} -> precision 2/3
    # AP = (1/2 + 2/3) / 2 = 7/12
    ap = average_precision_per_class([[1], [0], [1], [0]], [[0.9], [0.9], [0.5], [0.1]])
    assert ap[0] == pytest.approx(7 / 12)


# ----------------------------------------------------------------- evaluate


def test_evaluate_is_json_serialisable():
    truth, scores = _random_multilabel(0, 30, 5)
    truth[:, 2] = False  # AP NaN -> None
    classes = ["dog", "cat", "rain", "car", "bird"]
    out = evaluate(truth, scores, classes, multilabel=True)
    text = json.dumps(out, allow_nan=False)
    back = json.loads(text)
    assert set(back) == {"lwlrap", "map@3", "accuracy", "per_class"}
    assert list(back["per_class"]) == classes
    assert back["per_class"]["rain"] == {"lwlrap": 0.0, "ap": None, "positives": 0}
    assert back["lwlrap"] == pytest.approx(lwlrap(truth, scores))
    assert back["map@3"] == pytest.approx(map_at_k(truth, scores, 3))
    assert back["accuracy"] == pytest.approx(top_k_accuracy(truth, scores, 1))
    for i, name in enumerate(classes):
        assert type(back["per_class"][name]["positives"]) is int
        assert back["per_class"][name]["positives"] == int(truth[:, i].sum())
    assert all(type(out[key]) is float for key in ("lwlrap", "map@3", "accuracy"))


def test_evaluate_single_label_and_no_labels():
    truth = np.eye(3)
    scores = np.array([[0.9, 0.05, 0.05], [0.1, 0.2, 0.7], [0.3, 0.4, 0.3]])
    out = evaluate(truth, scores, ["a", "b", "c"], multilabel=False)
    # ranks of the true labels: 1, 2, 3 (the last clip's label c is scored 0.3, tied
    # with label a, both below 0.4 -> pessimistic rank 3)
    assert out["accuracy"] == pytest.approx(1 / 3)
    assert out["map@3"] == pytest.approx((1 + 1 / 2 + 1 / 3) / 3)
    assert out["lwlrap"] == pytest.approx((1 + 1 / 2 + 1 / 3) / 3)
    empty = evaluate(np.zeros((2, 2)), np.zeros((2, 2)), ["a", "b"], multilabel=True)
    assert empty["lwlrap"] is None and empty["map@3"] is None and empty["accuracy"] is None
    json.dumps(empty, allow_nan=False)


# -------------------------------------------------------------- bad inputs


@pytest.mark.parametrize(
    "truth, scores, match",
    [
        (np.ones(3), np.ones(3), "2-D"),
        (np.ones((2, 3, 1)), np.ones((2, 3, 1)), "2-D"),
        (np.ones((2, 3)), np.ones((2, 4)), "shapes differ"),
        (np.ones((2, 3)), np.ones((3, 3)), "shapes differ"),
        (np.ones((2, 3)), np.array([[0.1, np.nan, 0.3], [0.1, 0.2, 0.3]]), "NaN"),
        (np.array([[0.5, 1.0]]), np.ones((1, 2)), "0/1"),
        (np.array([[2, 0]]), np.ones((1, 2)), "0/1"),
        (np.array([["a", "b"]]), np.ones((1, 2)), "truth"),
        (np.ones((2, 0)), np.ones((2, 0)), "at least one class"),
    ],
)
@pytest.mark.parametrize(
    "fn",
    [lwlrap, lwlrap_per_class, map_at_k, top_k_accuracy, average_precision_per_class],
)
def test_bad_input_raises(fn, truth, scores, match):
    with pytest.raises(ValueError, match=match):
        fn(truth, scores)


def test_bad_k_and_evaluate_arguments():
    truth, scores = np.eye(3), np.random.default_rng(0).random((3, 3))
    for bad_k in (0, -1, 1.5):
        with pytest.raises(ValueError, match="k must be"):
            map_at_k(truth, scores, k=bad_k)
        with pytest.raises(ValueError, match="k must be"):
            top_k_accuracy(truth, scores, k=bad_k)
    with pytest.raises(ValueError, match="class names"):
        evaluate(truth, scores, ["a", "b"], multilabel=False)
    with pytest.raises(ValueError, match="unique"):
        evaluate(truth, scores, ["a", "a", "b"], multilabel=False)
    with pytest.raises(ValueError, match="more than one true label"):
        evaluate(np.ones((3, 3)), scores, ["a", "b", "c"], multilabel=False)
    with pytest.raises(ValueError, match="NaN"):
        evaluate(truth, np.full((3, 3), np.nan), ["a", "b", "c"], multilabel=True)

"""Prediction files (`soundtag.outputs`): every format written and parsed back.

The scores are those of a tiny real run on held-out demo clips plus a few
unreadable files, so rows, NaN rows and reasons look like the real thing."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from helpers import bad_files, held_out, shared_run

from soundtag import outputs
from soundtag.errors import ConfigError
from soundtag.predict import Tagger


pytestmark = pytest.mark.usefixtures("single_torch_thread")


@pytest.fixture(scope="module")
def tagged(tmp_path_factory, private_cache):
    """(names, scores, classes, errors) of 6 real clips and 3 unreadable files."""
    tagger = Tagger.load([shared_run(tmp_path_factory, "cnn6")])
    files = held_out().files[:6]
    bad = bad_files(tmp_path_factory.mktemp("bad"))
    files = files[:2] + [bad["text"]] + files[2:4] + [bad["missing"], bad["empty"]] + files[4:]
    scores, errors = tagger.tag_files(files, workers=1, progress=False)
    assert sorted(errors) == [2, 5, 6]
    return [f.name for f in files], scores, tagger.classes, errors


def by_hand_top(row: np.ndarray, classes: list[str], k: int) -> list[tuple[str, float]]:
    best = sorted(range(len(classes)), key=lambda j: -row[j])[:k]
    return [(classes[j], float(row[j])) for j in best]


def test_top_k_is_sorted_best_first_and_empty_for_nan_rows(tagged):
    names, scores, classes, errors = tagged
    rows = outputs.top_k(scores, classes, 4)
    for i, row in enumerate(rows):
        if i in errors:
            assert row == []
        else:
            assert row == by_hand_top(scores[i], classes, 4)


def test_kaggle2018_has_the_three_best_labels(tagged, tmp_path):
    names, scores, classes, errors = tagged
    path = outputs.write(tmp_path / "sub.csv", "kaggle2018", names, scores, classes, errors)
    table = pd.read_csv(path, keep_default_na=False)
    assert list(table.columns) == ["fname", "label"]
    assert table.fname.tolist() == names
    for i, label in enumerate(table.label):
        if i in errors:
            assert label == ""
        else:
            assert label.split(" ") == [c for c, _ in by_hand_top(scores[i], classes, 3)]


def test_kaggle_files_with_errors_get_a_sidecar(tagged, tmp_path):
    names, scores, classes, errors = tagged
    for fmt in ("kaggle2018", "kaggle2019"):
        path = outputs.write(tmp_path / f"{fmt}.csv", fmt, names, scores, classes, errors)
        side = pd.read_csv(tmp_path / f"{fmt}.csv.errors.csv")
        assert list(side.columns) == ["fname", "error"]
        assert dict(zip(side.fname, side.error)) == {names[i]: reason for i, reason in errors.items()}
        assert path == tmp_path / f"{fmt}.csv"


def test_kaggle_files_without_errors_get_no_sidecar(tagged, tmp_path):
    names, scores, classes, errors = tagged
    ok = [i for i in range(len(names)) if i not in errors]
    outputs.write(tmp_path / "sub.csv", "kaggle2018", [names[i] for i in ok], scores[ok], classes, {})
    assert not (tmp_path / "sub.csv.errors.csv").exists()


def test_kaggle2019_has_a_score_column_per_class(tagged, tmp_path):
    names, scores, classes, errors = tagged
    path = outputs.write(tmp_path / "sub.csv", "kaggle2019", names, scores, classes, errors)
    table = pd.read_csv(path)
    assert list(table.columns) == ["fname", *classes]
    assert table.fname.tolist() == names
    np.testing.assert_allclose(table[classes].to_numpy(), scores, atol=1e-6)  # NaN rows stay NaN


def test_csv_top_k_with_errors(tagged, tmp_path):
    names, scores, classes, errors = tagged
    path = outputs.write(tmp_path / "tags.csv", "csv", names, scores, classes, errors, k=4)
    table = pd.read_csv(path, keep_default_na=False)
    assert list(table.columns) == ["fname", *[f"{c}_{r}" for r in range(1, 5) for c in ("label", "score")],
                                   "error"]
    for i, row in table.iterrows():
        if i in errors:
            assert row.error == errors[i] and row.label_1 == "" and row.score_1 == ""
            continue
        assert row.error == ""
        expected = by_hand_top(scores[i], classes, 4)
        assert [row[f"label_{r}"] for r in range(1, 5)] == [c for c, _ in expected]
        got = [float(row[f"score_{r}"]) for r in range(1, 5)]
        np.testing.assert_allclose(got, [s for _, s in expected], atol=1e-6)
        assert got == sorted(got, reverse=True)


def test_csv_with_k_above_the_class_count(tagged, tmp_path):
    names, scores, classes, errors = tagged
    path = outputs.write(tmp_path / "tags.csv", "csv", names, scores[:, :2], classes[:2], errors, k=5)
    assert [c for c in pd.read_csv(path).columns if c.startswith("label_")] == ["label_1", "label_2"]


def test_json_top_k_with_errors(tagged, tmp_path):
    names, scores, classes, errors = tagged
    path = outputs.write(tmp_path / "tags.json", "json", names, scores, classes, errors, k=2)
    rows = json.loads(path.read_text())
    assert [r["fname"] for r in rows] == names
    for i, r in enumerate(rows):
        if i in errors:
            assert r["tags"] == [] and r["error"] == errors[i]
            continue
        assert r["error"] is None
        expected = by_hand_top(scores[i], classes, 2)
        assert [t["label"] for t in r["tags"]] == [c for c, _ in expected]
        np.testing.assert_allclose([t["score"] for t in r["tags"]], [s for _, s in expected], atol=1e-6)
        assert r["tags"][0]["score"] >= r["tags"][1]["score"]


def test_tags_lists_exactly_the_labels_at_or_above_their_threshold(tagged, tmp_path):
    names, scores, classes, errors = tagged
    ok = [i for i in range(len(names)) if i not in errors]
    # per-class thresholds: the median score of each class over the readable clips,
    # one class set exactly on a score (>= counts) and one out of reach
    thresholds = np.median(scores[ok], axis=0)
    thresholds[0] = scores[ok[0], 0]
    thresholds[1] = 2.0
    path = outputs.write(tmp_path / "tags.csv", "tags", names, scores, classes, errors, thresholds=thresholds)
    table = pd.read_csv(path, keep_default_na=False)
    assert list(table.columns) == ["fname", "labels", "error"]
    for i, row in table.iterrows():
        expected = [] if i in errors else [c for j, c in enumerate(classes) if scores[i, j] >= thresholds[j]]
        assert (row.labels.split(",") if row.labels else []) == expected
        assert row.error == errors.get(i, "")
    assert classes[0] in table.labels[ok[0]].split(",")
    assert classes[1] not in ",".join(table.labels)


def test_tags_without_thresholds_is_a_config_error(tagged, tmp_path):
    names, scores, classes, errors = tagged
    with pytest.raises(ConfigError, match="threshold"):
        outputs.write(tmp_path / "tags.csv", "tags", names, scores, classes, errors)


def test_unknown_format_is_a_config_error(tagged, tmp_path):
    names, scores, classes, errors = tagged
    with pytest.raises(ConfigError, match="kaggle2018"):
        outputs.write(tmp_path / "x.xml", "xml", names, scores, classes, errors)
    assert not (tmp_path / "x.xml").exists()


def test_missing_parent_folders_are_created(tagged, tmp_path):
    names, scores, classes, errors = tagged
    path = outputs.write(tmp_path / "a" / "b" / "sub.csv", "kaggle2018", names, scores, classes, errors)
    assert path.is_file()

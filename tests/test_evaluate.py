"""`soundtag evaluate` and threshold tuning: figures on the held-out demo clips
checked against hand computations, the files it writes, the JSON the command
prints, and F1-optimal thresholds against brute force."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from helpers import DEMO, MULTI, PNG_MAGIC, held_out, shared_run, warm_cache
from sklearn.metrics import label_ranking_average_precision_score

from soundtag import datasets, evaluation, metrics
from soundtag.cli import main
from soundtag.errors import DataError
from soundtag.predict import Tagger
from soundtag.run import Run

# ---------------------------------------------------------------- tune_thresholds



pytestmark = pytest.mark.usefixtures("single_torch_thread")


def f1_at(truth: np.ndarray, scores: np.ndarray, t: float) -> float:
    predicted = scores >= t
    tp = (predicted & truth).sum()
    return 0.0 if tp == 0 else 2 * tp / (predicted.sum() + truth.sum())


def brute_force_best_f1(truth: np.ndarray, scores: np.ndarray) -> float:
    return max(f1_at(truth, scores, t) for t in np.unique(scores))


def constructed_case() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(7)
    n = 60
    truth = np.zeros((n, 5), bool)
    scores = np.zeros((n, 5))
    # class 0: overlapping score distributions
    truth[:, 0] = rng.random(n) < 0.3
    scores[:, 0] = rng.normal(np.where(truth[:, 0], 0.6, 0.4), 0.15)
    # class 1: perfectly separable, positives above every negative
    truth[:20, 1] = True
    scores[:, 1] = np.where(truth[:, 1], 0.7, 0.2) + rng.uniform(0, 0.05, n)
    # class 2: one positive ranked below a few negatives
    truth[5, 2] = True
    scores[:, 2] = rng.uniform(0, 0.3, n)
    scores[5, 2] = 0.25
    # class 3: coarse scores with many ties
    truth[:, 3] = rng.random(n) < 0.5
    scores[:, 3] = np.round(np.where(truth[:, 3], rng.uniform(0.3, 1, n), rng.uniform(0, 0.7, n)), 1)
    # class 4: no positives at all
    scores[:, 4] = rng.random(n)
    return truth, scores


def test_tuned_thresholds_maximise_each_class_f1():
    truth, scores = constructed_case()
    thresholds = metrics.tune_thresholds(truth, scores)
    assert thresholds.shape == (5,)
    for j in range(4):
        best = brute_force_best_f1(truth[:, j], scores[:, j])
        assert f1_at(truth[:, j], scores[:, j], thresholds[j]) == pytest.approx(best, abs=1e-12), j
    assert f1_at(truth[:, 1], scores[:, 1], thresholds[1]) == 1.0
    assert scores[truth[:, 1], 1].min() >= thresholds[1] > scores[~truth[:, 1], 1].max()
    assert thresholds[4] == 0.5


def test_tuned_thresholds_are_scores_of_the_class():
    truth, scores = constructed_case()
    thresholds = metrics.tune_thresholds(truth, scores)
    for j in range(4):
        assert thresholds[j] in scores[:, j]


def test_run_thresholds_are_the_tuned_out_of_fold_thresholds(tmp_path_factory, private_cache):
    run = Run.open(shared_run(tmp_path_factory, "cnn6"))
    clips = run.read_clips()
    dataset = datasets.read(DEMO).subset("train")
    assert clips.names == dataset.names
    held = clips.fold == 0
    truth = dataset.targets[held] > 0
    oof = run.fold_scores(0)
    saved = run.thresholds()
    for j in range(len(run.classes)):
        if truth[:, j].any():
            best = brute_force_best_f1(truth[:, j], oof[:, j])
            assert f1_at(truth[:, j], oof[:, j], saved[j]) == pytest.approx(best, abs=1e-9)
        else:
            assert saved[j] == 0.5


# ---------------------------------------------------------------- evaluation.evaluate


@pytest.fixture(scope="module")
def single(tmp_path_factory, private_cache) -> Tagger:
    tagger = Tagger.load([shared_run(tmp_path_factory, "cnn6")])
    warm_cache(held_out(DEMO).files, tagger.feature_configs[0])
    return tagger


@pytest.fixture(scope="module")
def multi(tmp_path_factory, private_cache) -> Tagger:
    tagger = Tagger.load([shared_run(tmp_path_factory, "multilabel")])
    warm_cache(held_out(MULTI).files, tagger.feature_configs[0])
    return tagger


@pytest.fixture(scope="module")
def single_result(single, tmp_path_factory):
    out = tmp_path_factory.mktemp("eval-single")
    return evaluation.evaluate(single, datasets.read(DEMO), "test", out, progress=False), out


def by_hand(truth: np.ndarray, scores: np.ndarray) -> tuple[float, float]:
    """MAP@3 and top-1 accuracy of single-label clips, by hand."""
    true = truth.argmax(1)
    rank = 1 + (scores > scores[np.arange(len(true)), true][:, None]).sum(1)
    return float(np.where(rank <= 3, 1.0 / rank, 0.0).mean()), float((scores.argmax(1) == true).mean())


def test_single_label_figures_match_hand_computations(single, single_result):
    result, _ = single_result
    part = held_out(DEMO)
    assert result["split"] == "test" and result["clips"] == len(part) == 92 and result["skipped"] == {}
    scores, errors = single.tag_dataset(part, progress=False)
    assert errors == {}
    truth = evaluation.truth_for(part, single.classes)
    map3, accuracy = by_hand(truth, scores)
    assert result["map@3"] == pytest.approx(map3, abs=1e-9)
    assert result["accuracy"] == pytest.approx(accuracy, abs=1e-9)
    lrap = label_ranking_average_precision_score(truth, scores, sample_weight=truth.sum(1))
    assert result["lwlrap"] == pytest.approx(lrap, abs=1e-9)
    assert set(result["per_class"]) == set(single.classes)
    assert sum(v["positives"] for v in result["per_class"].values()) == 92
    assert all(v["ap"] is None or 0 <= v["ap"] <= 1 for v in result["per_class"].values())


def test_single_label_files(single_result):
    result, out = single_result
    assert json.loads((out / "metrics.json").read_text()) == json.loads(json.dumps(result))
    for name in ("per_class_ap.png", "confusion.png"):
        assert (out / name).read_bytes()[:8] == PNG_MAGIC
    assert not (out / "per_class_lwlrap.png").exists()


def test_multi_label_figures_and_files(multi, tmp_path):
    assert multi.multilabel
    dataset = datasets.read(MULTI)
    result = evaluation.evaluate(multi, dataset, "test", tmp_path, progress=False)
    part = held_out(MULTI)
    assert result["clips"] == len(part) == 40
    scores, _ = multi.tag_dataset(part, progress=False)
    truth = evaluation.truth_for(part, multi.classes)
    assert (truth.sum(1) > 1).any()
    lrap = label_ranking_average_precision_score(truth, scores, sample_weight=truth.sum(1))
    assert result["lwlrap"] == pytest.approx(lrap, abs=1e-9)
    assert sum(v["positives"] for v in result["per_class"].values()) == int(truth.sum())
    assert (tmp_path / "per_class_lwlrap.png").read_bytes()[:8] == PNG_MAGIC
    assert not (tmp_path / "confusion.png").exists()
    assert json.loads((tmp_path / "metrics.json").read_text())["lwlrap"] == pytest.approx(result["lwlrap"])


def small_2018(root: Path, labels: dict[str, str], broken: bool = False) -> Path:
    """A 2018-layout dataset of held-out demo clips under the given labels."""
    part = held_out(DEMO)
    (root / "audio_train").mkdir(parents=True)
    (root / "audio_test").mkdir()
    rows = []
    for i, (name, label) in enumerate(labels.items()):
        source = part.files[part.names.index(name)]
        shutil.copy(source, root / "audio_train" / name)
        shutil.copy(source, root / "audio_test" / name)
        rows.append(f"{name},{label}")
    if broken:
        (root / "audio_test" / "broken.wav").write_text("no audio here\n")
        rows.append(f"broken.wav,{next(iter(labels.values()))}")
    (root / "train.csv").write_text("fname,label\n" + "\n".join(rows[: len(labels)]) + "\n")
    (root / "test.csv").write_text("fname,label\n" + "\n".join(rows) + "\n")
    return root


def test_unreadable_test_clips_are_skipped_with_their_reason(single, tmp_path):
    part = held_out(DEMO)
    labels = {n: part.labels(i)[0] for i, n in enumerate(part.names[:5])}
    root = small_2018(tmp_path / "data", labels, broken=True)
    result = evaluation.evaluate(single, datasets.read(root), "test", progress=False)
    assert result["clips"] == 5
    (path, reason), = result["skipped"].items()
    assert path.endswith("broken.wav") and "not readable as audio" in reason


def test_classes_unknown_to_the_run_are_a_data_error(single, tmp_path):
    part = held_out(DEMO)
    root = small_2018(tmp_path / "data", {part.names[0]: "Kazoo", part.names[1]: part.labels(1)[0]})
    with pytest.raises(DataError, match="Kazoo"):
        evaluation.evaluate(single, datasets.read(root), "test", progress=False)


def test_a_split_without_labels_is_a_data_error(single):
    with pytest.raises(DataError, match="no labelled clips"):
        evaluation.evaluate(single, datasets.read(DEMO), "noisy", progress=False)


# ---------------------------------------------------------------- the evaluate command


def test_evaluate_json_prints_one_object(single, single_result, tmp_path_factory, tmp_path, capsys):
    run = shared_run(tmp_path_factory, "cnn6")
    assert main(["evaluate", str(run), str(DEMO), "--json", "--out", str(tmp_path)]) == 0
    figures = json.loads(capsys.readouterr().out)
    assert {"map@3", "lwlrap", "accuracy", "per_class"} <= set(figures)
    assert figures["map@3"] == pytest.approx(single_result[0]["map@3"], abs=1e-9)
    assert (tmp_path / "metrics.json").is_file()


def test_evaluate_prints_a_table(single, tmp_path_factory, tmp_path, capsys):
    run = shared_run(tmp_path_factory, "cnn6")
    assert main(["evaluate", str(run), str(DEMO), "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert out.startswith("test: 92 clips, lwlrap ")
    assert "| class | positives | lwlrap | AP |" in out
    assert (tmp_path / "confusion.png").is_file()

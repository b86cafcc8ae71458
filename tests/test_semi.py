"""Pseudo-labels and label spreading: the threshold schedule and the
pseudo-label rule on constructed scores, label spreading on constructed
clusters, and a tiny run of each recipe on a small FSDKaggle2018-layout subset
of the demo set (verified and unverified clips)."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from helpers import DEMO, MULTI, PNG_MAGIC, RECIPE_TINY, error_line, warm_cache
from soundtag import cli, config, datasets, predict, semi
from soundtag.clips import ClipTable
from soundtag.errors import ConfigError
from soundtag.pipeline import fold_scorer, score_files
from soundtag.run import Run
from soundtag.semi import PseudoConfig, SpreadConfig, pseudo_labels, spread_clips, spread_frame, threshold_schedule
from soundtag.train import training_table

CLASSES = ["Acoustic_guitar", "Chime", "Clarinet", "Flute", "Harmonica", "Laughter"]  # 52 verified, 20 not


def test_threshold_schedule_moves_linearly():
    np.testing.assert_allclose(threshold_schedule(0.9, 0.7, 3), [0.9, 0.8, 0.7])
    np.testing.assert_allclose(threshold_schedule(0.6, 0.9, 4), [0.6, 0.7, 0.8, 0.9])
    np.testing.assert_allclose(threshold_schedule(0.5, 0.1, 1), [0.5])
    np.testing.assert_allclose(PseudoConfig(start=0.95, end=0.75, iterations=5).thresholds(),
                               [0.95, 0.9, 0.85, 0.8, 0.75])


def test_pseudo_labels_pass_the_lower_threshold_and_skip_those_above_the_upper():
    scores = np.array([[0.7, 0.2, 0.1], [0.3, 0.3, 0.4], [0.05, 0.95, 0.0], [np.nan, 0.9, 0.1], [0.1, 0.1, 0.8]])
    picked, targets = pseudo_labels(scores, 0.6, None, multilabel=False)
    assert picked.tolist() == [True, False, True, False, True]
    assert targets.argmax(1)[picked].tolist() == [0, 1, 2] and targets[~picked].sum() == 0
    picked, _ = pseudo_labels(scores, 0.6, 0.9, multilabel=False)
    assert picked.tolist() == [True, False, False, False, True]
    multi = np.array([[0.8, 0.7, 0.1], [0.5, 0.2, 0.4]])
    picked, targets = pseudo_labels(multi, 0.6, None, multilabel=True)
    assert picked.tolist() == [True, False] and targets.tolist() == [[1, 1, 0], [0, 0, 0]]


def test_recipe_settings_are_checked():
    base = config.resolve("fast", overrides=RECIPE_TINY)
    for bad, message in [({"pool": "train"}, "pool"), ({"upper": 0.8}, "upper"), ({"iterations": 0}, "iterations"),
                         ({"start": 1.2}, "start")]:
        with pytest.raises(ConfigError, match=message):
            PseudoConfig(**bad).validate(base)
    with pytest.raises(ConfigError, match="noisy: only"):
        PseudoConfig().validate(config.resolve("fast", overrides={**RECIPE_TINY, "noisy": "only"}))
    for bad, message in [({"kernel": "linear"}, "kernel"), ({"alpha": 1.0}, "alpha"), ({"disagree": "keep"}, "disagree"),
                         ({"n_neighbors": 0}, "n_neighbors")]:
        with pytest.raises(ConfigError, match=message):
            SpreadConfig(**bad).validate(base)


def clusters(seed: int = 0) -> tuple[ClipTable, np.ndarray, np.ndarray, np.ndarray]:
    """Three tight clusters of embeddings, one a class: 8 verified clips each
    (labelled), and 4 unverified clips each, the last of which is labelled as
    the next cluster's class."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(3, 16)) * 3
    rows, labels, labelled = [], [], []
    for c in range(3):
        for i in range(12):
            rows.append(centres[c] + rng.normal(size=16) * 0.2)
            labels.append((c + 1) % 3 if i == 11 else c)
            labelled.append(i < 8)
    n = len(rows)
    table = ClipTable(["a", "b", "c"], False, [f"/clips/{i}.wav" for i in range(n)], [f"{i}.wav" for i in range(n)],
                      np.eye(3, dtype=np.float32)[labels], np.where(labelled, np.arange(n) % 2, -1),
                      np.ones(n, np.float32), np.where(labelled, "curated", "unverified").astype("<U10"))
    return table, np.array(rows, np.float32), np.arange(n), np.array(labelled)


@pytest.mark.parametrize("kernel", ["knn", "rbf"])
def test_label_spreading_keeps_agreeing_clips_and_drops_disagreeing_ones(kernel: str):
    table, embeddings, rows, labelled = clusters()
    settings = SpreadConfig(kernel=kernel, gamma=5.0, n_neighbors=5)
    frame = spread_frame(table, 0, rows, labelled, embeddings, settings)
    unlabelled = frame[frame.role == "unlabelled"]
    assert (unlabelled.spread == np.array(["a", "b", "c"])[unlabelled.row // 12]).all()  # each cluster's class
    disagreeing = {11, 23, 35}
    kept = spread_clips(table, frame, settings)
    assert sorted(np.array(kept.names)[kept.origin == "selected"]) == \
        sorted(f"{i}.wav" for i in range(36) if not labelled[i] and i not in disagreeing)
    assert all(f == (0,) for f, o in zip(kept.train_folds, kept.origin) if o == "selected")
    assert (kept.origin == "curated").sum() == 24 and "noisy" not in kept.origin

    weighted = SpreadConfig(kernel=kernel, gamma=5.0, n_neighbors=5, disagree="weight", disagree_weight=0.25)
    doubted = spread_clips(table, frame, weighted)
    noisy = doubted.origin == "noisy"
    assert sorted(np.array(doubted.names)[noisy]) == sorted(f"{i}.wav" for i in disagreeing)
    trained, _ = training_table(doubted, weighted.final_config(config.resolve("fast", overrides=RECIPE_TINY)))
    assert trained.weight[noisy].tolist() == [0.25] * 3 and (trained.weight[~noisy] == 1).all()


@pytest.fixture(scope="module")
def subset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An FSDKaggle2018-layout set of the demo's 72 training clips of six classes, features cached."""
    root = tmp_path_factory.mktemp("subset") / "data"
    table = pd.read_csv(DEMO / "train.csv")
    rows = table[table.label.isin(CLASSES)]
    (root / "audio_train").mkdir(parents=True)
    for name in rows.fname:
        shutil.copy(DEMO / "audio_train" / name, root / "audio_train" / name)
    rows.to_csv(root / "train.csv", index=False)
    warm_cache(datasets.read(root).files, config.resolve("fast", overrides=RECIPE_TINY).features)
    return root


def test_a_pseudo_label_iteration_adds_pool_clips_with_their_predicted_labels(subset: Path, tmp_path: Path,
                                                                             monkeypatch: pytest.MonkeyPatch):
    data = datasets.read(subset)
    base = config.resolve("fast", overrides=RECIPE_TINY)
    settings = PseudoConfig(pool="unverified", start=0.0, end=0.0, iterations=1)
    folder = semi.run_pseudo(data, settings, base, tmp_path / "pseudo", progress=False)
    first, second = Run.open(folder / "iter0"), Run.open(folder / "iter1")
    assert "unverified" not in first.read_clips().origin
    table = second.read_clips()
    pseudo = table.origin == "pseudo"
    pool = data.subset("train").select(~data.subset("train").verified)
    assert sorted(np.array(table.names)[pseudo]) == sorted(pool.names) and (table.fold[pseudo] == -1).all()
    assert all(f == (0,) for f, p in zip(table.train_folds, pseudo) if p)
    scores, _ = score_files(fold_scorer(first, 0), [table.files[i] for i in np.flatnonzero(pseudo)])
    assert (table.targets[pseudo].argmax(1) == scores.argmax(1)).all()
    assert table.targets[pseudo].sum(1).tolist() == [1] * int(pseudo.sum())

    # fold 0 of iter1 trained on every pool clip: it scores none of them again, and they keep their labels
    scored: list[str] = []
    monkeypatch.setattr(semi, "score_files", lambda scorer, files, *a: (scored.extend(files), score_files(
        scorer, files, *a))[1])
    again = semi.pseudo_clips(second, ClipTable.from_dataset(pool), 0.0, None, None, False)
    assert scored == []
    assert sorted(zip(again.names, map(tuple, again.targets))) == \
        sorted(zip(np.array(table.names)[pseudo], map(tuple, table.targets[pseudo])))

    report = (folder / "report.md").read_text()
    assert "| iter1 |" in report and "iter1 fold 0" in report
    assert (folder / "report.png").read_bytes()[:8] == PNG_MAGIC
    clip = [data.files[0]]
    np.testing.assert_allclose(predict.Tagger.load([folder]).tag_files(clip, progress=False)[0],
                               predict.Tagger.load([folder / "iter1"]).tag_files(clip, progress=False)[0])


def test_label_spreading_recipe_from_the_command_line(subset: Path, tmp_path: Path, capsys: pytest.CaptureFixture):
    (tmp_path / "spread.yaml").write_text(yaml.safe_dump({"kernel": "knn", "n_neighbors": 5}))
    (tmp_path / "train.yaml").write_text(yaml.safe_dump(RECIPE_TINY))
    args = ["--config", str(tmp_path / "spread.yaml"), "--train-config", str(tmp_path / "train.yaml")]
    out = tmp_path / "spread"
    assert cli.main(["spread", str(subset), "--out", str(out), *args]) == 0
    assert "| final |" in capsys.readouterr().out
    spread = pd.read_csv(out / "spread.csv")
    agree = spread[(spread.role == "unlabelled") & (spread.given == spread.spread)]
    final = Run.open(out / "final").read_clips()
    assert sorted(np.array(final.names)[final.origin == "selected"]) == sorted(agree.fname)
    assert "unverified" not in final.origin and "noisy" not in final.origin
    assert "kept fold 0" in (out / "report.md").read_text()
    assert (out / "spread.png").read_bytes()[:8] == PNG_MAGIC

    assert cli.main(["spread", str(MULTI), "--out", str(tmp_path / "multi"), *args]) == 2
    assert "single-label" in error_line(capsys)

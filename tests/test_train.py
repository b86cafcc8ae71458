"""Training: configs, cross-validation folds, batches, the training loop, run
folders, resuming, `--init`, and the `soundtag train` command.

Everything trains a tiny network (PANNs Cnn6 at 1/8 width) for a few epochs on
small subsets of the bundled real-audio demo set, so the whole module runs in
well under a minute and a half on two CPU cores.
"""

from __future__ import annotations

import dataclasses
import errno
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from helpers import DEMO, MULTI, PNG_MAGIC, InterruptInEpoch, error_line, warm_cache
from soundtag import checkpoint, cli, datasets, loop, models, task
from soundtag import store as store_module
from soundtag import train as training
from soundtag.clips import ClipTable, noisy_policy
from soundtag.config import CropConfig, ModelConfig, OptimConfig, TrainConfig, merge, presets, resolve
from soundtag.errors import ConfigError, DataError, SoundtagError
from soundtag.loader import ClipSet, eval_batches, steps_per_epoch, train_batches
from soundtag.loop import TrainingDiverged, clip_logits
from soundtag.optim import build_optimizer, build_schedule
from soundtag.registry import Registry
from soundtag.run import Run, RunError, tensors_digest
from soundtag.splits import assign_folds, fold_ids, inner_split
from soundtag.store import extract
from soundtag.task import Task

TINY_MODEL = {"name": "cnn6", "params": {"width": 0.125}}
# The fast preset (5 folds, fold 0 trained, mixup + SpecAugment) with a tiny network.
TINY = {"epochs": 3, "batch_size": 16, "threads": 1, "bf16": False, "selection": "inner", "model": TINY_MODEL}
CLASSES4 = ["Acoustic_guitar", "Applause", "Bass_drum", "Cello"]
ESC_CLASSES = ["Chime", "Cowbell", "Flute"]


def tiny_config(**changes) -> TrainConfig:
    return resolve("fast", overrides=merge(TINY, changes))


def make_2018(root: Path, classes: list[str], per_class: int) -> Path:
    """An FSDKaggle2018-layout dataset of the first `per_class` demo clips of each class."""
    table = pd.read_csv(DEMO / "train.csv")
    rows = table[table.label.isin(classes)].groupby("label").head(per_class)
    (root / "audio_train").mkdir(parents=True)
    for name in rows.fname:
        shutil.copy(DEMO / "audio_train" / name, root / "audio_train" / name)
    rows.to_csv(root / "train.csv", index=False)
    return root


def make_esc(root: Path, classes: list[str], per_class: int = 5) -> Path:
    """An ESC-50-like dataset: meta/esc50.csv with its own folds 1..per_class, audio/ of real clips."""
    table = pd.read_csv(DEMO / "train.csv")
    (root / "audio").mkdir(parents=True)
    (root / "meta").mkdir()
    lines = ["filename,fold,target,category,esc10,src_file,take"]
    for target, label in enumerate(classes):
        for fold, name in enumerate(table[table.label == label].fname[:per_class], start=1):
            shutil.copy(DEMO / "audio_train" / name, root / "audio" / name)
            lines.append(f"{name},{fold},{target},{label},False,{name[:-4]},A")
    (root / "meta" / "esc50.csv").write_text("\n".join(lines) + "\n")
    return root


def tensors_equal(a: Path, b: Path) -> None:
    """Two safetensors files hold exactly the same tensors."""
    ta, tb = load_file(str(a)), load_file(str(b))
    assert sorted(ta) == sorted(tb)
    different = [n for n in ta if not torch.equal(ta[n], tb[n])]
    assert not different, f"{len(different)} tensor(s) differ, e.g. {different[:3]}"


def metric_rows(folder: Path, k: int = 0) -> pd.DataFrame:
    """metrics.csv without its timing columns (the only ones allowed to differ between runs)."""
    return pd.read_csv(folder / f"fold{k}" / "metrics.csv").drop(columns=["clips_per_s", "seconds"])


def read_progress(path: Path) -> dict:
    """The `progress` entry of a checkpoint file."""
    return checkpoint.load(path)["progress"]


def train_table(data: Path) -> ClipTable:
    """A dataset's training split as a clip table."""
    return ClipTable.from_dataset(datasets.read(data).subset("train"))


class PoisonInEpoch(loop.Hook):
    """Sets every weight to NaN after the first training step of epoch `epoch`."""

    def __init__(self, epoch: int):
        self.epoch = epoch

    def batch_end(self, state, x, logits, loss) -> None:
        if state.epoch + 1 == self.epoch:
            with torch.no_grad():
                for parameter in state.model.parameters():
                    parameter.fill_(float("nan"))


class StepsPerFold(loop.Hook):
    """Records the steps an epoch of each fold takes (batches over its training clips)."""

    def __init__(self):
        self.steps: dict[int, int] = {}

    def start(self, state) -> None:
        self.steps[state.fold] = state.steps


def assert_same_table(a: ClipTable, b: ClipTable) -> None:
    """Two clip tables hold the same rows, column by column (and with the same dtypes)."""
    assert (a.classes, a.multilabel, len(a)) == (b.classes, b.multilabel, len(b))
    assert a.names == b.names and a.files == b.files and a.train_folds == b.train_folds
    for name in ("targets", "fold", "weight", "origin"):
        x, y = getattr(a, name), getattr(b, name)
        assert x.dtype.kind == y.dtype.kind and np.array_equal(x, y), name
    assert a.weight.dtype == b.weight.dtype == np.float32 and a.targets.dtype == b.targets.dtype == np.float32


# training sets torch's thread count (config `threads: 1`); the fixture gives the session its own back
pytestmark = pytest.mark.usefixtures("single_torch_thread")


@pytest.fixture
def tiny_yaml(tmp_path: Path) -> Path:
    """The TINY overrides as a --config file."""
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(TINY))
    return path


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """4 classes × 10 real clips, FSDKaggle2018 layout."""
    return make_2018(tmp_path_factory.mktemp("tiny"), CLASSES4, 10)


@pytest.fixture(scope="module")
def esc(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_esc(tmp_path_factory.mktemp("esc"), ESC_CLASSES)


@pytest.fixture(scope="module")
def baseline(tiny: Path, tmp_path_factory: pytest.TempPathFactory) -> Run:
    """An uninterrupted 3-epoch run on the tiny set: the reference for resumed runs."""
    out = tmp_path_factory.mktemp("baseline") / "run"
    return training.train(datasets.read(tiny), tiny_config(), out, progress=False)


@pytest.fixture(scope="module")
def tiny_store(tiny: Path, baseline: Run):
    """The tiny set's training clips and their cached features (shared with the baseline run)."""
    data = datasets.read(tiny).subset("train")
    return data, extract(data.files, baseline.config.features, progress=False)


# ------------------------------------------------------------------ config


def test_every_preset_resolves_and_validates():
    assert presets() == ["baseline", "fast", "fused", "kaggle2018", "kaggle2019", "quality"]
    for name in presets():
        config = resolve(name)
        config.validate()
        assert config.epochs >= 1 and (config.augment or config.model.name == "summary")  # fitted: no batches
    fast, k2019 = resolve("fast"), resolve("kaggle2019")
    assert fast.model == ModelConfig("cnn6", {"width": 0.5, "dropout": 0.2}) and fast.train_folds == [0]
    assert k2019.model.name == "vgg" and k2019.noisy_weight == 0.5 and k2019.bf16
    assert resolve("kaggle2018").features.n_mels == 128


@pytest.mark.parametrize("overrides, words", [
    ({"model": {"name": "resnet99"}}, ["'resnet99'", "cnn6", "cnn10", "mobilenetv2", "resnet", "vgg"]),
    ({"model": {"params": {"depth": 3}}}, ["depth", "width", "dropout"]),
    ({"augment": [{"name": "wobble"}]}, ["'wobble'", "mixup", "specaugment"]),
    ({"augment": [{"name": "mixup", "beta": 1.0}]}, ["beta", "alpha"]),
    ({"optim": {"name": "adam"}}, ["'adam'", "valid optimisers: adamw, radam, sgd"]),
    ({"optim": {"schedule": "linear"}}, ["'linear'", "valid schedules: constant, cosine", "onecycle"]),
    ({"crop": {"pad_mode": "mirror"}}, ["'mirror'", "wrap, constant"]),
    ({"epoch": 3}, ["epoch", "valid:", "epochs", "batch_size", "noisy_weight"]),
    ({"optim": {"lrate": 0.1}}, ["config.optim", "lrate", "lr", "weight_decay"]),
    ({"features": {"n_mel": 32}}, ["n_mel", "n_mels", "hop_length"]),
    ({"folds": 1}, ["folds", "'own'"]),
])
def test_unknown_or_invalid_options_fail_listing_the_valid_ones(overrides, words):
    with pytest.raises(ConfigError) as e:
        resolve("fast", overrides=overrides)
    for word in words:
        assert word in str(e.value), str(e.value)


def test_unknown_preset_lists_the_presets():
    with pytest.raises(ConfigError, match="unknown preset 'turbo'; valid presets: baseline, fast, fused, "
                                          "kaggle2018, kaggle2019, quality"):
        resolve("turbo")


@pytest.mark.parametrize("change", [
    {"model": ModelConfig("resnet99")},
    {"augment": [{"name": "wobble"}]},
    {"optim": OptimConfig(name="adam")},
])
def test_train_rejects_an_invalid_config_before_creating_the_run(tiny, tmp_path, change, monkeypatch):
    config = dataclasses.replace(tiny_config(), **change)
    monkeypatch.setattr(training, "extract", lambda *a, **k: pytest.fail("features computed"))
    with pytest.raises(ConfigError, match="valid"):
        training.train(datasets.read(tiny), config, tmp_path / "run", progress=False)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("extra, message", [
    (["--model", "resnet99"], "unknown model 'resnet99'; valid models: "),
    (["--preset", "turbo"], "unknown preset 'turbo'"),
    (["--folds", "three"], "--folds takes a whole number or 'own'"),
])
def test_cli_rejects_an_invalid_config_before_creating_the_run(tiny, tmp_path, capsys, extra, message):
    out = tmp_path / "run"
    assert cli.main(["train", str(tiny), "--out", str(out), *extra]) == 2
    assert message in error_line(capsys)
    assert not out.exists()


def test_cli_rejects_an_unknown_option_in_the_config_file(tiny, tmp_path, capsys):
    (tmp_path / "bad.yaml").write_text("epochs: 2\noptim: {lr: 0.01, nesterov: true}\n")
    out = tmp_path / "run"
    assert cli.main(["train", str(tiny), "--out", str(out), "--config", str(tmp_path / "bad.yaml")]) == 2
    line = error_line(capsys)
    assert "nesterov" in line and "valid:" in line and "momentum" in line
    assert not out.exists()


def test_yaml_file_merges_over_the_preset_and_cli_options_over_the_file(tmp_path):
    path = tmp_path / "mine.yaml"
    path.write_text(yaml.safe_dump({
        "epochs": 4, "batch_size": 24, "optim": {"lr": 0.01}, "model": {"params": {"width": 0.5}},
        "augment": [{"name": "gain", "p": 0.5}], "features": {"n_mels": 32}, "folds": 4,
    }))
    from_file = resolve("fast", path)
    assert from_file.epochs == 4 and from_file.batch_size == 24
    # Nested mappings merge key by key, lists replace.
    assert from_file.optim == dataclasses.replace(resolve("fast").optim, lr=0.01)
    assert from_file.model == ModelConfig("cnn6", {"width": 0.5, "dropout": 0.2})
    assert from_file.augment == [{"name": "gain", "p": 0.5}]
    assert from_file.features.n_mels == 32 and from_file.features.hop_length == 1024  # the preset's
    assert from_file.patience == 10 and from_file.train_folds == [0]  # untouched preset values

    args = cli.build_parser().parse_args(
        ["train", "DATA", "--out", "RUN", "--config", str(path), "--epochs", "2", "--batch-size", "8",
         "--folds", "3", "--fold", "1", "--fold", "2", "--threads", "1", "--no-bf16"])
    overrides = cli.train_overrides(args)
    assert overrides == {"folds": 3, "train_folds": [1, 2], "epochs": 2, "batch_size": 8, "threads": 1,
                         "bf16": False}
    config = resolve(args.preset, args.config, overrides)
    assert (config.epochs, config.batch_size, config.folds, config.train_folds) == (2, 8, 3, [1, 2])
    assert config.optim.lr == 0.01 and config.model.params == {"width": 0.5, "dropout": 0.2}


def test_cli_overrides_folds_model_and_bf16():
    parse = cli.build_parser().parse_args
    assert cli.train_overrides(parse(["train", "D", "--out", "R"])) == {}
    assert cli.train_overrides(parse(["train", "D", "--out", "R", "--folds", "own"])) == \
        {"folds": "own", "train_folds": None}
    assert cli.train_overrides(parse(["train", "D", "--out", "R", "--folds", "5"])) == \
        {"folds": 5, "train_folds": None}
    assert cli.train_overrides(parse(["train", "D", "--out", "R", "--bf16"])) == {"bf16": True}
    # A model named on the command line drops the preset's (or file's) model parameters.
    overrides = cli.train_overrides(parse(["train", "D", "--out", "R", "--model", "cnn10"]))
    assert overrides == {"model": {"name": "cnn10", "params": {}}}
    assert parse(["train", "D", "--out", "R"]).preset == "fast"


def test_cli_model_drops_the_params_of_the_configured_model(tmp_path):
    """Regression: `--model` used to keep the file's model params (ConfigError for resnet's `layers`)."""
    path = tmp_path / "resnet.yaml"
    path.write_text("model: {name: resnet, params: {layers: [1, 1, 1, 1], width: 0.25}}\n")
    assert resolve("fast", path).model == ModelConfig("resnet", {"layers": [1, 1, 1, 1], "width": 0.25})
    args = cli.build_parser().parse_args(["train", "D", "--out", "R", "--config", str(path), "--model", "cnn6"])
    assert resolve(args.preset, args.config, cli.train_overrides(args)).model == ModelConfig("cnn6", {})


@pytest.mark.parametrize("crop", [{"low_pct": 80, "high_pct": 20}, {"low_pct": -5}, {"high_pct": 120}])
def test_bad_crop_percentiles_are_a_config_error(crop):
    """Regression: they used to pass validation and fail inside the first training step."""
    with pytest.raises(ConfigError, match="low_pct"):
        resolve("fast", overrides={"crop": crop})


# ------------------------------------------------------------------ folds


def test_single_label_folds_spread_every_class_evenly():
    data = train_table(DEMO)
    for k in (4, 5):
        folds = assign_folds(data, k, seed=0)
        assert fold_ids(folds) == list(range(k)) and (folds >= 0).all()
        per_fold = np.stack([data.targets[folds == f].sum(0) for f in range(k)])  # [folds, classes]
        assert (per_fold.max(0) - per_fold.min(0) <= 1).all()
        sizes = np.bincount(folds)
        assert sizes.max() - sizes.min() <= 1 and sizes.sum() == len(data)
    assert (assign_folds(data, 5, seed=0) == assign_folds(data, 5, seed=0)).all()
    assert (assign_folds(data, 5, seed=0) != assign_folds(data, 5, seed=1)).any()


def test_multilabel_folds_balance_positives_and_leave_noisy_clips_out():
    data = train_table(MULTI)
    noisy = data.origin == "noisy"
    assert noisy.sum() == 80 and (data.origin == "curated").sum() == 80
    folds = assign_folds(data, 4, seed=0)
    assert (folds[noisy] == -1).all()
    curated, targets = folds[~noisy], data.targets[~noisy]
    assert sorted(set(curated)) == [0, 1, 2, 3]
    per_fold = np.stack([targets[curated == f].sum(0) for f in range(4)])
    expected = targets.sum(0) / 4
    assert per_fold.min() >= 1, "every class needs a positive in every fold"
    assert np.abs(per_fold - expected).max() <= 3
    # Iterative stratification beats a random split by a wide margin (random: ~2.4 on this set).
    assert (per_fold.max(0) - per_fold.min(0)).mean() <= 1.5
    sizes = np.bincount(curated)
    assert sizes.max() - sizes.min() <= 3


def test_a_class_with_fewer_clips_than_folds_stays_in_training_with_a_warning(caplog):
    multi = train_table(MULTI)
    with caplog.at_level("WARNING", logger="soundtag"):
        folds = assign_folds(multi, 5)
    message = caplog.text
    assert "4 class(es) have fewer clips than the 5 folds" in message
    for name in ("Cowbell (4)", "Flute (4)", "Telephone (4)", "Trumpet (4)"):
        assert name in message
    assert "Harmonica" not in message
    rare = multi.targets[:, [multi.classes.index(c) for c in ("Cowbell", "Flute", "Telephone", "Trumpet")]].any(1)
    assert (folds[rare] == -1).all() and (folds[~rare & (multi.origin != "noisy")] >= 0).all()
    assert len(fold_ids(folds)) == 5

    single = train_table(DEMO)
    cello = np.flatnonzero(single.targets[:, single.classes.index("Cello")])
    fewer = single.select(np.setdiff1d(np.arange(len(single)), cello[2:]))
    folds = assign_folds(fewer, 3)
    kept = fewer.targets[:, fewer.classes.index("Cello")] > 0
    assert kept.sum() == 2 and (folds[kept] == -1).all() and len(fold_ids(folds)) == 3
    with pytest.raises(DataError, match="fewer than the 5 folds"):
        assign_folds(fewer.select(np.arange(4)), 5)


def test_the_inner_split_holds_out_a_stratified_share_of_trusted_training_clips():
    single = train_table(DEMO)
    folds = assign_folds(single, 5)
    single.fold = folds
    train = single.training(0)
    inner = inner_split(single, train, 0.2, seed=3)
    assert not (inner & ~train).any(), "only training clips are held out for selection"
    assert not (inner & single.validation(0)).any(), "the scoring fold never reaches selection"
    per_class = single.targets[inner].sum(0)
    assert (per_class >= 1).all() and abs(inner.sum() - 0.2 * train.sum()) <= len(single.classes)
    assert np.array_equal(inner, inner_split(single, train, 0.2, seed=3))
    multi = train_table(MULTI)
    multi.fold = assign_folds(multi, 3)
    inner = inner_split(multi, multi.training(0), 0.2, seed=0)
    assert inner.any() and (multi.origin[inner] != "noisy").all()


def test_own_folds_come_from_the_csv_fold_column(esc):
    data = datasets.read(esc)
    assert data.layout == "csv" and len(data) == 15 and all(f.is_file() for f in data.files)
    folds = assign_folds(ClipTable.from_dataset(data.subset("train")), "own")
    assert (folds == data.fold).all() and fold_ids(folds) == [1, 2, 3, 4, 5]
    for f in range(1, 6):
        assert sorted(np.array(data.classes)[data.targets[folds == f].argmax(1)]) == sorted(data.classes)
    no_folds = train_table(DEMO)
    with pytest.raises(DataError, match="no fold column; use --folds K"):
        assign_folds(no_folds, "own")


# ------------------------------------------------------------------ clip tables


def test_clip_table_round_trips(tmp_path):
    classes = ["Bark", "Meow", "Purr"]
    table = ClipTable(
        classes, True,
        files=["/data/a.wav", "/data/with space/b,c.wav", "/data/\"q\".ogg", "d.wav", "/e.flac", "/f.wav"],
        names=["0001", "b,c.wav", '"q".ogg', "d.wav", "e.flac", "007"],
        targets=np.array([[1, 0, 0], [1, 1, 0], [0, 0, 0], [0, 1, 1], [1, 1, 1], [0, 0, 1]], np.float32),
        fold=np.array([0, 1, -1, -1, 2, -1]),
        weight=np.array([1.0, 0.1, 0.25, 1 / 3, 0.7, 2.5], np.float32),
        origin=np.array(["curated", "unverified", "noisy", "pseudo", "selected", "curated"]),
        train_folds=[(), (), (0,), (0, 2), (), (1,)])
    path = tmp_path / "clips.csv"
    table.save(path)
    back = ClipTable.load(path, classes, True)
    assert_same_table(back, table)  # float32 weights exactly, names like "0001" stay text, empty label sets
    assert back.fold.dtype == np.int64 and back.labels(1) == ["Bark", "Meow"] and back.labels(2) == []
    assert back.training(0).tolist() == [False, True, True, True, True, False]
    assert back.training(1).tolist() == [True, False, False, False, True, True]
    assert back.validation(2).tolist() == [False, False, False, False, True, False]
    assert back.held_out_candidates.tolist() == [True, True, False, False, False, True]
    # select and join keep every column together
    picked = back.select([5, 2]).join(back.select(np.array([True] + [False] * 5)))
    assert picked.names == ["007", '"q".ogg', "0001"] and picked.train_folds == [(1,), (0,), ()]
    assert picked.weight.tolist() == [2.5, 0.25, 1.0] and picked.origin.tolist() == ["curated", "noisy", "curated"]
    assert picked.fold.tolist() == [-1, -1, 0] and np.array_equal(picked.targets, table.targets[[5, 2, 0]])

    with pytest.raises(DataError, match=r"row 3 has label 'Meow', not among the run's classes"):
        ClipTable.load(path, ["Bark", "Purr"], True)
    pd.read_csv(path).drop(columns="train_folds").to_csv(tmp_path / "old.csv", index=False)
    with pytest.raises(DataError, match=r"lacks column\(s\) train_folds"):
        ClipTable.load(tmp_path / "old.csv", classes, True)
    with pytest.raises(DataError, match="unknown clip origin"):
        dataclasses.replace(table, origin=np.array(["curated"] * 5 + ["made-up"]))


def test_each_fold_can_have_its_own_training_clips(tiny, tmp_path):
    """Clips for some folds only (e.g. pseudo-labels made by each fold's own model) train only there."""
    base = train_table(tiny)
    demo = datasets.read(DEMO).subset("train")
    others = np.flatnonzero(np.isin(demo.names, base.names, invert=True)
                            & np.isin(np.array(demo.classes)[demo.targets.argmax(1)], CLASSES4))
    assert len(others) == 8
    extra = ClipTable.from_dataset(demo.select(others))
    extra = dataclasses.replace(  # over the run's class list
        extra, classes=CLASSES4, targets=extra.targets[:, [demo.classes.index(c) for c in CLASSES4]],
        origin=np.array(["pseudo"] * 2 + ["selected"] * 6), weight=np.array([1.0] * 2 + [0.5] * 6, np.float32),
        train_folds=[(0,)] * 2 + [(1, 3)] * 6)
    assert (extra.targets.sum(1) == 1).all()
    table = base.join(extra)
    pseudo, selected = table.origin == "pseudo", table.origin == "selected"
    assert table.training(0)[pseudo].all() and not table.training(0)[selected].any()
    assert table.training(1)[selected].all() and not table.training(1)[pseudo].any()
    assert not table.training(2)[pseudo | selected].any()

    warm_cache(extra.files, tiny_config().features)
    steps = StepsPerFold()
    config = tiny_config(epochs=1, batch_size=2, train_folds=[0, 1], selection="last")
    run = training.train(table, config, tmp_path / "run", progress=False, hooks=[steps])
    # 32 clips not held out + 2 for fold 0 only, or + 6 for folds 1 and 3 (40 for both if ignored)
    assert steps.steps == {0: 17, 1: 19}
    assert run.trained_folds() == [0, 1] and run.data == {}

    back = run.read_clips()
    extras = pseudo | selected
    assert (back.fold[extras] == -1).all() and sorted(set(back.fold[~extras])) == [0, 1, 2, 3, 4]
    assert_same_table(back, dataclasses.replace(table, fold=back.fold))
    saved = pd.read_csv(run.folder / "clips.csv", dtype=str, keep_default_na=False)
    assert list(saved.train_folds) == [""] * 40 + ["0"] * 2 + ["1 3"] * 6
    assert list(saved.origin[40:]) == ["pseudo"] * 2 + ["selected"] * 6
    assert list(saved.weight[40:]) == ["1"] * 2 + ["0.5"] * 6
    for k in range(5):
        allowed = np.where(pseudo, k == 0, np.where(selected, k in (1, 3), True))
        assert (back.training(k) == ((back.fold != k) & allowed)).all(), k
    assert run.summary()["oof_clips"] == 16  # held-out clips of folds 0 and 1, none of them extra


def test_noisy_only_training_set(tmp_path):
    data = datasets.read(MULTI)
    part = data.subset("train")
    config = tiny_config(epochs=1, batch_size=32, folds=3, noisy="only", noisy_weight=0.25)
    warm_cache(part.select(part.noisy).files, config.features)
    run = training.train(data, config, tmp_path / "run", progress=False)

    table = run.read_clips()
    assert table.names == list(np.array(part.names)[part.noisy]) and len(table) == 80
    assert set(table.origin) == {"noisy"} and np.unique(table.weight).size == 1
    # Their own labels are all there is: the folds are assigned among the noisy clips.
    assert fold_ids(table.fold) == [0, 1, 2] and (table.fold >= 0).all()
    sizes = np.bincount(table.fold)
    assert sizes.max() - sizes.min() <= 3
    assert np.stack([table.targets[table.fold == k].sum(0) for k in range(3)]).min() >= 1
    assert table.training(0).sum() == 80 - sizes[0] and table.validation(0).sum() == sizes[0]
    oof, scores = run.read_oof()
    assert sorted(oof.fname) == sorted(np.array(table.names)[table.fold == 0]) and scores.shape == (sizes[0], 23)
    assert run.summary()["oof_clips"] == sizes[0] and list(run.history(0).epoch) == [1]

    # The three policies, on the dataset's table.
    full = ClipTable.from_dataset(part)
    noisy = full.origin == "noisy"
    assert_same_table(noisy_policy(full, "only", 0.25), full.select(noisy))
    assert_same_table(noisy_policy(full, "exclude", 0.25), full.select(~noisy))
    included = noisy_policy(full, "include", 0.25)
    assert included.weight.dtype == np.float32 and (included.weight == np.where(noisy, 0.25, 1.0)).all()
    with pytest.raises(DataError, match="noisy: only was asked for, but the dataset has no noisy clips"):
        noisy_policy(full.select(~noisy), "only", 1.0)
    with pytest.raises(ConfigError, match="unknown noisy 'some'; valid: include, exclude, only"):
        tiny_config(noisy="some")


# ------------------------------------------------------------------ batches


def test_train_batches_crop_between_percentiles_with_matching_targets(tiny_store):
    data, store = tiny_store
    n = len(store)
    # Weights carry each clip's position, so a batch says which clips it holds.
    clips = ClipSet(store, np.arange(n), data.targets, np.arange(n, dtype=np.float32))
    crop = CropConfig(25, 75, "wrap")
    low, high = np.percentile(store.frames, [25, 75])
    batches = list(train_batches(clips, 16, crop, np.random.default_rng(0)))
    assert len(batches) == steps_per_epoch(n, 16) == 3
    seen = []
    for x, y, w, _ in batches:
        length = x.shape[-1]
        assert x.shape == (16, 1, store.config.n_mels, length) and x.dtype == torch.float32
        assert max(8, round(low)) <= length <= max(8, round(high))
        idx = w.numpy().astype(int)
        assert torch.equal(y, torch.from_numpy(data.targets[idx]))
        for row, i in zip(x[:, 0].numpy(), idx):
            spec = store[i].astype(np.float32)
            if spec.shape[1] >= length:  # a crop: some window of the clip
                windows = np.lib.stride_tricks.sliding_window_view(spec, length, axis=1)
                assert any(np.array_equal(row, windows[:, s]) for s in range(windows.shape[1]))
        seen.extend(idx)
    assert set(seen) == set(range(n))
    assert len({x.shape[-1] for x, *_ in batches}) > 1, "each batch draws its own crop length"


def test_epoch_clips_draws_a_fresh_subset_each_epoch(tiny_store):
    data, store = tiny_store
    n = len(store)
    clips = ClipSet(store, np.arange(n), data.targets, np.arange(n, dtype=np.float32))
    draws = []
    for seed in (0, 1):
        batches = list(train_batches(clips, 8, CropConfig(), np.random.default_rng(seed), limit=16))
        assert len(batches) == 2 and all(len(w) == 8 for _, _, w, _ in batches)
        picked = np.concatenate([w.numpy() for _, _, w, _ in batches]).astype(int)
        assert len(set(picked)) == 16
        draws.append(set(picked))
    assert draws[0] != draws[1]
    assert len(list(train_batches(clips, 8, CropConfig(), np.random.default_rng(0), limit=10 * n))) == -(-n // 8)
    with pytest.raises(ConfigError, match="epoch_clips"):
        tiny_config(epoch_clips=0)


def test_two_ranks_take_disjoint_shares_of_each_step(tiny_store):
    data, store = tiny_store
    n = len(store)
    clips = ClipSet(store, np.arange(n), data.targets, np.arange(n, dtype=np.float32))
    crop = CropConfig()
    # Both ranks draw from the same seed, as in training.
    ranks = [list(train_batches(clips, 8, crop, np.random.default_rng(7), rank, 2)) for rank in (0, 1)]
    assert len(ranks[0]) == len(ranks[1]) == steps_per_epoch(n, 8, 2) == 2
    everything = []
    for (x0, _, w0, _), (x1, _, w1, _) in zip(*ranks):
        assert x0.shape == x1.shape, "the ranks of a step crop to the same length"
        a, b = set(w0.numpy().astype(int)), set(w1.numpy().astype(int))
        assert len(a) == len(b) == 8 and not a & b
        everything += [*a, *b]
    assert len(everything) == len(set(everything)) == 32


def test_eval_batches_cover_every_clip_once_within_the_slack():
    rng = np.random.default_rng(3)
    lengths = np.concatenate([rng.integers(5, 400, 60), [900, 1000]])
    specs = [np.arange(3 * n, dtype=np.float32).reshape(3, n) + 10000 * i for i, n in enumerate(lengths)]
    seen = []
    for idx, x in eval_batches(specs.__getitem__, lengths, batch_size=8, slack=1.1, max_frames=512):
        assert 1 <= len(idx) <= 8
        assert lengths[idx].max() <= 1.1 * lengths[idx].min()
        width = min(lengths[idx].max(), 512)
        assert x.shape == (len(idx), 1, 3, width)
        for row, i in zip(x[:, 0].numpy(), idx):
            n = lengths[i]
            if n >= width:  # centre crop
                start = (n - width) // 2
                assert np.array_equal(row, specs[i][:, start:start + width])
            else:  # wrapped from the start
                assert np.array_equal(row, specs[i][:, np.arange(width) % n])
        seen.extend(idx.tolist())
    assert sorted(seen) == list(range(len(lengths)))


def test_eval_batches_over_real_clips(tiny_store):
    _, store = tiny_store
    lengths = store.frames
    seen = []
    for idx, x in eval_batches(store.__getitem__, lengths, batch_size=16, slack=1.25):
        assert lengths[idx].max() <= 1.25 * lengths[idx].min()
        assert x.shape[-1] == lengths[idx].max()
        seen.extend(idx.tolist())
    assert sorted(seen) == list(range(len(store)))


# ------------------------------------------------------------------ training


def test_training_writes_a_complete_run_folder(baseline, tiny_store):
    data, _ = tiny_store
    folder = baseline.folder
    for name in ("config.yaml", "run.json", "clips.csv", "oof.csv", "oof.npy", "summary.json", "summary.md",
                 "thresholds.json", "curves.png", "fold0/model.safetensors", "fold0/metrics.csv",
                 "fold0/checkpoint.safetensors", "fold0/oof.npy"):
        assert (folder / name).is_file(), name
    assert sorted(p.name for p in (folder / "fold0").iterdir()) == \
        ["checkpoint.safetensors", "metrics.csv", "model.safetensors", "oof.npy"]  # one checkpoint file
    assert not (folder / "folds.csv").exists() and not (folder / "skipped.csv").exists()
    assert not list(folder.glob("**/*.tmp"))
    assert sorted(p.name for p in folder.iterdir() if p.is_dir()) == ["fold0"]
    assert (folder / "curves.png").read_bytes()[:8] == PNG_MAGIC
    assert baseline.curves_path == folder / "curves.png"

    info = json.loads((folder / "run.json").read_text())
    assert info["classes"] == CLASSES4 and info["multilabel"] is False
    assert info["data"]["layout"] == "kaggle2018"
    saved = pd.read_csv(folder / "clips.csv", dtype={"fname": str, "train_folds": str}, keep_default_na=False)
    assert list(saved.columns) == ["fname", "file", "labels", "fold", "weight", "origin", "train_folds"]
    assert list(saved.fname) == data.names and list(saved.file) == [str(f) for f in data.files]
    assert list(saved.labels) == [data.labels(i)[0] for i in range(len(data))]
    assert (saved.weight == 1.0).all() and (saved.train_folds == "").all()
    assert list(saved.origin) == ["curated" if v else "unverified" for v in data.verified]
    assert {"curated", "unverified"} == set(saved.origin)
    folds = baseline.read_clips()
    assert folds.names == data.names and sorted(set(folds.fold)) == [0, 1, 2, 3, 4]
    assert np.array_equal(folds.targets, data.targets) and (folds.fold == saved.fold.to_numpy()).all()
    val = saved[saved.fold == 0]
    assert len(val) == 8 and folds.validation(0).sum() == 8 and folds.training(0).sum() == 32

    history = pd.read_csv(folder / "fold0" / "metrics.csv")
    assert list(history.columns) == ["epoch", "train_loss", "val_loss", "map@3", "lr", "clips_per_s", "seconds"]
    assert list(history.epoch) == [1, 2, 3]
    assert np.isfinite(history[["train_loss", "val_loss", "map@3"]].to_numpy()).all()
    assert read_progress(folder / "fold0" / "checkpoint.safetensors")["epoch"] == 3
    last = baseline.load_checkpoint(0)
    assert sorted(last) == ["model", "optimizer", "progress", "schedule"] and last["progress"]["epoch"] == 3
    pd.testing.assert_frame_equal(baseline.history(0), history)

    summary = json.loads((folder / "summary.json").read_text())
    assert summary["metric"] == "map@3" and summary["oof_clips"] == 8
    assert set(summary["folds"]) == {"0"}
    fold = summary["folds"]["0"]
    assert {"best_epoch", "epochs", "map@3", "lwlrap", "selection_loss", "selection_map@3", "seconds"} <= set(fold)
    assert fold["epochs"] == 3 and fold["best_epoch"] == history.epoch[history["map@3"].idxmax()]
    assert {"lwlrap", "map@3", "accuracy"} <= set(summary["oof"])
    md = (folder / "summary.md").read_text()
    assert md.startswith("| fold | epoch kept |") and "| 0 | " in md and "out-of-fold (8 clips)" in md

    oof = pd.read_csv(folder / "oof.csv")
    assert list(oof.columns) == ["fname", "fold", "labels", *CLASSES4]
    assert sorted(oof.fname) == sorted(val.fname) and (oof.fold == 0).all()
    truth = dict(zip(data.names, (data.labels(i)[0] for i in range(len(data)))))
    assert list(oof.labels) == [truth[n] for n in oof.fname]
    np.testing.assert_allclose(oof[CLASSES4].sum(axis=1), 1.0, atol=1e-3)  # softmax scores
    thresholds = json.loads((folder / "thresholds.json").read_text())
    assert list(thresholds) == CLASSES4
    assert baseline.thresholds().shape == (4,)
    # The same through the run's readers: float32 scores, the summary, the fold's best scores.
    table, scores = baseline.read_oof()
    assert list(table.columns) == ["fname", "fold", "labels"] and list(table.fname) == list(oof.fname)
    assert scores.dtype == np.float32 and scores.shape == (8, 4)
    np.testing.assert_allclose(scores, oof[CLASSES4].to_numpy(), atol=1e-5)
    assert np.array_equal(np.load(folder / "oof.npy"), scores)
    assert np.array_equal(baseline.fold_scores(0), scores)  # one trained fold: its scores are the oof ones
    assert baseline.summary() == summary


def test_run_reloads_without_pickles_and_rescores_its_validation_clips(baseline, tiny_store):
    data, store = tiny_store
    folder = baseline.folder
    for pattern in ("*.pt", "*.pth", "*.pkl", "*.pickle", "*.ckpt", "*.bin"):
        assert not list(folder.rglob(pattern)), pattern
    for path in folder.rglob("*.safetensors"):
        assert load_file(str(path))
    run = Run.open(folder)
    assert run.config == tiny_config() and run.classes == CLASSES4 and run.trained_folds() == [0]
    model = run.load_model(0)
    assert not model.training and model.head.out_features == 4
    assert all(t.dtype == torch.float32 for t in model.state_dict().values() if t.is_floating_point())

    val = run.read_clips().validation(0)
    clips = ClipSet(store, np.flatnonzero(val), data.targets[val], np.ones(int(val.sum()), np.float32))
    assert run.task == Task(False)
    scores = run.task.activate(clip_logits(model, clips, run.config.batch_size))
    again = run.task.activate(clip_logits(run.load_models()[0], clips, run.config.batch_size))
    assert np.array_equal(scores, again)
    saved = np.load(folder / "fold0" / "oof.npy", allow_pickle=False)
    np.testing.assert_allclose(scores, saved, atol=1e-5)
    oof = pd.read_csv(folder / "oof.csv").set_index("fname").loc[np.array(data.names)[val]]
    np.testing.assert_allclose(oof[CLASSES4].to_numpy(), scores, atol=1e-4)


def test_damaged_or_diverged_weights_are_refused(baseline, tmp_path):
    """Weights carry a checksum of their tensors; a mismatch or NaN/inf is a RunError, not garbage scores."""
    folder = tmp_path / "run"
    shutil.copytree(baseline.folder, folder)
    path = folder / "fold0" / "model.safetensors"
    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
    weights = load_file(str(path))
    assert set(meta) == {"sha256"} and Run.open(folder).weights(0).keys() == weights.keys()
    changed = {**weights, "head.bias": weights["head.bias"] + 1e-3}
    save_file(changed, str(path), metadata=meta)
    with pytest.raises(RunError, match="do not match their checksum"):
        Run.open(folder).load_model(0)
    changed["head.bias"] = torch.full_like(weights["head.bias"], float("nan"))
    save_file(changed, str(path), metadata={"sha256": tensors_digest(changed)})
    with pytest.raises(RunError, match=r"NaN or inf \(in head\.bias\)"):
        Run.open(folder).weights(0)


def test_loss_is_weighted_bce_or_softmax_cross_entropy():
    torch.manual_seed(0)
    logits, weights = torch.randn(4, 3), torch.tensor([1.0, 0.5, 0.5, 2.0])
    multi = torch.tensor([[1, 0, 1], [0, 1, 0], [1, 1, 1], [0, 0, 1]], dtype=torch.float32)
    bce = torch.nn.functional.binary_cross_entropy_with_logits(logits, multi, reduction="none").mean(1)
    multilabel, single_label = Task(True), Task(False)
    assert torch.allclose(multilabel.loss(logits, multi), bce.mean())
    assert torch.allclose(multilabel.loss(logits, multi, weights), (bce * weights).sum() / weights.sum())
    single = torch.eye(3)[[0, 2, 1, 2]]
    ce = torch.nn.functional.cross_entropy(logits, single.argmax(1), reduction="none")
    assert torch.allclose(single_label.loss(logits, single, weights), (ce * weights).sum() / weights.sum())
    smoothed = torch.nn.functional.cross_entropy(logits, single.argmax(1), label_smoothing=0.1)
    assert torch.allclose(single_label.loss(logits, single, None, 0.1), smoothed)
    # Either loss can be named whatever the task; the task's own is the default.
    assert torch.allclose(single_label.loss(logits, multi, weights, name="bce"),
                          multilabel.loss(logits, multi, weights))
    assert torch.allclose(multilabel.loss(logits, single, None, 0.1, "cross_entropy"), smoothed)
    # Scores: sigmoids for multi-label sets, a softmax otherwise; and the figure that picks the best epoch.
    assert np.allclose(multilabel.activate(logits.numpy()), torch.sigmoid(logits).numpy())
    assert np.allclose(single_label.activate(logits.numpy()), torch.softmax(logits, 1).numpy())
    assert (multilabel.metric, single_label.metric) == ("lwlrap", "map@3")


def test_loss_registry_takes_per_clip_weights(tiny, tmp_path, monkeypatch):
    losses = Registry("loss")  # a copy, so that the test's loss is gone after it
    for name in task.LOSSES:
        losses.add(name, task.LOSSES.get(name))
    monkeypatch.setattr(task, "LOSSES", losses)
    calls = []

    def scaled_squared(logits, y, smoothing=0.0, scale=1.0):
        calls.append((tuple(logits.shape), smoothing, scale))
        return scale * ((torch.softmax(logits, 1) - y) ** 2).sum(1)

    task.LOSSES.add("scaled_squared", scaled_squared)
    torch.manual_seed(0)
    logits, y = torch.randn(4, 3), torch.eye(3)[[0, 2, 1, 2]]
    weights = torch.tensor([1.0, 0.5, 0.0, 2.0])
    per_clip = 3.0 * ((torch.softmax(logits, 1) - y) ** 2).sum(1)
    loss = Task(False).loss(logits, y, weights, 0.1, "scaled_squared", {"scale": 3.0})
    assert torch.allclose(loss, (per_clip * weights).sum() / weights.sum())
    assert not torch.allclose(loss, per_clip.mean())  # the weights matter; a zero weight drops a clip
    assert calls == [((4, 3), 0.1, 3.0)]
    assert torch.allclose(Task(True).loss(logits, y, name="scaled_squared"), per_clip.mean() / 3)

    TrainConfig(loss="scaled_squared", loss_params={"scale": 2.0}).validate()
    with pytest.raises(ConfigError, match=r"unknown loss 'nope'; valid \w+: bce, bootstrap_soft, cross_entropy, lq, "
                                         r"scaled_squared$"):
        TrainConfig(loss="nope").validate()
    with pytest.raises(ConfigError, match=r"loss 'scaled_squared' got unknown parameter\(s\) power; accepted: scale"):
        TrainConfig(loss="scaled_squared", loss_params={"power": 2}).validate()
    with pytest.raises(ConfigError, match="accepted: none"):
        TrainConfig(loss="bce", loss_params={"gamma": 2.0}).validate()
    with pytest.raises(ConfigError, match="loss_params given without a loss"):
        TrainConfig(loss_params={"scale": 2.0}).validate()

    # Training calls the named loss, with its parameters and the config's smoothing, at every step.
    calls.clear()
    config = tiny_config(epochs=1, loss="scaled_squared", loss_params={"scale": 2.0}, label_smoothing=0.1)
    run = training.train(datasets.read(tiny), config, tmp_path / "run", progress=False)
    assert [c for c in calls if c[0] == (16, 4)] == [((16, 4), 0.1, 2.0)] * 2  # 32 training clips
    assert Run.open(run.folder).config.loss == "scaled_squared" and run.config.loss_params == {"scale": 2.0}


def step_through(config: OptimConfig, total_steps: int) -> float:
    """Run a schedule to its end; the last learning rate."""
    optimizer = build_optimizer(torch.nn.Linear(2, 2).parameters(), config)
    schedule = build_schedule(optimizer, config, total_steps)
    for _ in range(total_steps):
        optimizer.step()
        schedule.step()
    return schedule.get_last_lr()[0]


@pytest.mark.parametrize("total_steps", [1, 2, 3, 4, 5, 6, 10, 20, 40])
@pytest.mark.parametrize("warmup", [0.05, 0.1, 0.2, 0.25, 0.5])
def test_one_cycle_schedule_takes_any_number_of_steps(warmup, total_steps):
    """Regression: torch's OneCycleLR divided by zero whenever warmup * total_steps == 1 (e.g. the
    fast preset's 0.2 with 5 steps in all: --epochs 1 on 129-160 clips)."""
    last = step_through(OptimConfig(schedule="onecycle", warmup=warmup), total_steps)
    assert np.isfinite(last) and 0 <= last <= OptimConfig().lr


def test_schedules_warm_up_and_anneal():
    for schedule in ("onecycle", "cosine", "constant"):
        config = OptimConfig(lr=0.01, schedule=schedule, warmup=0.25)
        optimizer = build_optimizer(torch.nn.Linear(2, 2).parameters(), config)
        steps = build_schedule(optimizer, config, total_steps=12)
        lrs = []
        for _ in range(12):
            lrs.append(optimizer.param_groups[0]["lr"])
            optimizer.step()
            steps.step()
        peak = int(np.argmax(lrs))
        assert max(lrs) == pytest.approx(0.01, rel=1e-6) and 1 <= peak <= 4, (schedule, lrs)
        assert lrs[0] < lrs[peak]
        if schedule == "constant":
            assert lrs[peak:] == [lrs[peak]] * (12 - peak)
        else:
            assert all(a >= b for a, b in zip(lrs[peak:], lrs[peak + 1:])) and lrs[-1] < 0.1 * lrs[peak]


def test_multilabel_set_trains_with_bce_lwlrap_and_noisy_weight(tmp_path):
    full = datasets.read(MULTI)
    keep = (full.split == "train") & (~full.noisy | (np.cumsum(full.noisy) <= 16))
    dataset = full.select(keep)
    config = tiny_config(epochs=1, batch_size=32, folds=3, train_folds=[0], noisy_weight=0.25)
    run = training.train(dataset, config, tmp_path / "run", progress=False)
    assert run.multilabel and run.metric == "lwlrap" and run.task == Task(True)

    table = run.read_clips()
    noisy = np.char.startswith(np.array(table.names), "n")
    assert list(table.origin) == ["noisy" if n else "curated" for n in noisy]
    assert noisy.sum() == 16 and (table.fold[noisy] == -1).all() and (table.fold[~noisy] >= 0).all()
    # The noisy clips' loss weight is part of the saved table.
    assert table.weight.dtype == np.float32 and (table.weight == np.where(noisy, 0.25, 1.0)).all()
    train, val = table.training(0), table.validation(0)
    assert sorted(np.unique(table.weight[train])) == [0.25, 1.0]
    assert train[noisy].all() and (table.weight[train] == 0.25).sum() == 16  # every noisy clip trains, down-weighted
    assert not (train & val).any() and (train | val).all() and not val[noisy].any()

    history = pd.read_csv(run.folder / "fold0" / "metrics.csv")
    assert "lwlrap" in history.columns and "map@3" not in history.columns and list(history.epoch) == [1]
    summary = json.loads((run.folder / "summary.json").read_text())
    assert summary["metric"] == "lwlrap" and "lwlrap" in summary["folds"]["0"]
    # Scores are sigmoids (not a softmax) and the validation loss is their (unweighted) binary cross-entropy.
    scores = run.fold_scores(0)
    assert not np.allclose(scores.sum(1), 1.0, atol=1e-2)
    p, y = np.clip(scores.astype(np.float64), 1e-7, 1 - 1e-7), table.targets[val]
    bce = -(y * np.log(p) + (1 - y) * np.log(1 - p)).mean()
    assert abs(history.val_loss[0] - bce) < 1e-3
    oof = pd.read_csv(run.folder / "oof.csv")
    assert len(oof) == val.sum() and not oof.fname.str.startswith("n").any()


def test_existing_run_folder_is_kept_without_force_and_replaced_with_it(tiny, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    dataset = datasets.read(tiny)
    with pytest.raises(RunError, match="already exists; pass --force"):
        training.train(dataset, tiny_config(epochs=1, batch_size=8), out, progress=False)
    assert [p.name for p in out.iterdir()] == ["notes.txt"]
    run = training.train(dataset, tiny_config(epochs=1, batch_size=8), out, force=True, progress=False)
    assert not (out / "notes.txt").exists() and run.trained_folds() == [0]
    assert (out / "summary.json").is_file()


@pytest.mark.parametrize("bf16, channels_last", [(True, True), (True, False), (False, False)])
def test_bf16_and_memory_format_options_train(tiny, tmp_path, bf16, channels_last):
    config = tiny_config(epochs=1, batch_size=8, bf16=bf16, channels_last=channels_last)
    run = training.train(datasets.read(tiny), config, tmp_path / "run", progress=False)
    assert Run.open(run.folder).config.bf16 is bf16
    weights = load_file(str(run.folder / "fold0" / "model.safetensors"))
    assert all(t.dtype in (torch.float32, torch.int64) for t in weights.values())
    history = pd.read_csv(run.folder / "fold0" / "metrics.csv")
    assert np.isfinite(history[["train_loss", "val_loss"]].to_numpy()).all()
    assert np.isfinite(np.load(run.folder / "fold0" / "oof.npy")).all()


# ------------------------------------------------------------------ resume


def test_resume_after_an_interrupt_matches_the_uninterrupted_run(baseline, tiny, tmp_path):
    out = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt):
        training.train(datasets.read(tiny), tiny_config(), out, progress=False, hooks=[InterruptInEpoch(2)])
    assert read_progress(out / "fold0" / "checkpoint.safetensors")["epoch"] == 1
    assert list(pd.read_csv(out / "fold0" / "metrics.csv").epoch) == [1]
    assert not (out / "summary.json").exists()

    run = training.resume(out, progress=False)
    assert run.folder == out
    tensors_equal(out / "fold0" / "model.safetensors", baseline.folder / "fold0" / "model.safetensors")
    tensors_equal(out / "fold0" / "checkpoint.safetensors", baseline.folder / "fold0" / "checkpoint.safetensors")
    assert run.load_checkpoint(0)["progress"] == baseline.load_checkpoint(0)["progress"]
    pd.testing.assert_frame_equal(metric_rows(out), metric_rows(baseline.folder))
    assert np.array_equal(np.load(out / "fold0" / "oof.npy"), np.load(baseline.folder / "fold0" / "oof.npy"))
    assert (out / "summary.json").is_file() and (out / "curves.png").is_file()


def test_resume_after_sigkill_matches_the_uninterrupted_run(baseline, tiny, tmp_path, tiny_yaml, capsys):
    out = tmp_path / "run"
    config = tiny_yaml
    command = [sys.executable, "-m", "soundtag.cli", "train", str(tiny), "--out", str(out),
               "--config", str(config)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    log = tmp_path / "train.log"
    with open(log, "w") as sink:
        proc = subprocess.Popen(command, env=env, stdout=sink, stderr=subprocess.STDOUT)
    saved = out / "fold0" / "checkpoint.safetensors"
    deadline = time.monotonic() + 120
    try:
        while proc.poll() is None and time.monotonic() < deadline:
            if saved.is_file() and read_progress(saved)["epoch"] >= 1:  # written in one step: whole or absent
                proc.send_signal(signal.SIGKILL)
                break
            time.sleep(0.005)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == -signal.SIGKILL, log.read_text()[-2000:]
    assert read_progress(saved)["epoch"] < 3 and not (out / "summary.json").exists()

    assert cli.main(["train", "--resume", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "| fold | epoch kept |" in printed and f"run: {out}" in printed
    tensors_equal(out / "fold0" / "model.safetensors", baseline.folder / "fold0" / "model.safetensors")
    tensors_equal(out / "fold0" / "checkpoint.safetensors", baseline.folder / "fold0" / "checkpoint.safetensors")
    pd.testing.assert_frame_equal(metric_rows(out), metric_rows(baseline.folder))


def test_resume_does_not_repeat_metrics_rows(tiny, tmp_path, monkeypatch):
    """Regression: a kill between an epoch's metrics row and its checkpoint repeated the row on resume."""
    out = tmp_path / "run"
    calls = []
    original = Run.save_checkpoint

    def killed_before_second_checkpoint(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return original(*args, **kwargs)

    monkeypatch.setattr(Run, "save_checkpoint", killed_before_second_checkpoint)
    with pytest.raises(KeyboardInterrupt):
        training.train(datasets.read(tiny), tiny_config(), out, progress=False)
    monkeypatch.undo()
    assert list(pd.read_csv(out / "fold0" / "metrics.csv").epoch) == [1, 2]  # epoch 2's row, not its checkpoint
    assert read_progress(out / "fold0" / "checkpoint.safetensors")["epoch"] == 1
    training.resume(out, progress=False)
    assert list(pd.read_csv(out / "fold0" / "metrics.csv").epoch) == [1, 2, 3]


def test_resume_with_an_unreadable_clip_reads_the_same_feature_cache(tiny, tmp_path, monkeypatch):
    data = tmp_path / "data"
    shutil.copytree(tiny, data)
    (data / "audio_train" / "broken.ogg").write_text("not audio")
    with open(data / "train.csv", "a") as table:
        table.write("broken.ogg,Cello,1\n")
    out = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt):
        training.train(datasets.read(data), tiny_config(), out, progress=False, hooks=[InterruptInEpoch(2)])
    assert "broken.ogg" not in Run.open(out).read_clips().names
    skipped = pd.read_csv(out / "skipped.csv")
    assert list(skipped.columns) == ["file", "reason"]
    assert list(skipped.file) == [str(data / "audio_train" / "broken.ogg")]
    assert skipped.reason[0]
    monkeypatch.setattr(store_module, "compute_all", pytest.fail)  # nothing may be extracted again
    training.resume(out, progress=False)
    assert list(pd.read_csv(out / "fold0" / "metrics.csv").epoch) == [1, 2, 3]

    # A clip the run trained on that is gone since: resume names it instead of training without it.
    gone = Path(Run.open(out).read_clips().files[5])
    gone.unlink()
    with pytest.raises(RunError, match=rf"1 training clip\(s\) of the run are gone or no longer readable "
                                       rf"\(first: {re.escape(str(gone))}: \w"):
        training.resume(out, progress=False)


def test_training_stops_on_a_nan_loss_keeping_the_last_checkpoint(baseline, tiny, tmp_path):
    out = tmp_path / "run"
    with pytest.raises(TrainingDiverged) as e:
        training.train(datasets.read(tiny), tiny_config(), out, progress=False, hooks=[PoisonInEpoch(2)])
    message = str(e.value)
    assert isinstance(e.value, SoundtagError) and "\n" not in message
    assert message.startswith("fold 0 epoch 2: the loss became nan;") and "checkpoint of epoch 1 is kept" in message
    run = Run.open(out)
    assert read_progress(out / "fold0" / "checkpoint.safetensors")["epoch"] == 1
    assert list(run.history(0).epoch) == [1] and not (out / "summary.json").exists()
    run.load_model(0)  # the best weights so far are finite (NaN weights are refused)
    # What was kept is sound: resuming it ends exactly where an uninterrupted run does.
    training.resume(out, progress=False)
    tensors_equal(out / "fold0" / "model.safetensors", baseline.folder / "fold0" / "model.safetensors")
    pd.testing.assert_frame_equal(metric_rows(out), metric_rows(baseline.folder))


def test_checkpoint_is_one_atomic_file(baseline, tiny, tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    fold = out / "fold0"
    replace, saves = os.replace, []

    def disk_full_at_the_second_checkpoint(src, dst):
        if Path(dst).name == "checkpoint.safetensors":
            saves.append(dst)
            if len(saves) == 2:
                raise OSError(errno.ENOSPC, "No space left on device")
        return replace(src, dst)

    monkeypatch.setattr(os, "replace", disk_full_at_the_second_checkpoint)
    with pytest.raises(OSError, match="No space left on device"):
        training.train(datasets.read(tiny), tiny_config(), out, progress=False)
    monkeypatch.undo()
    assert len(saves) == 2
    assert sorted(p.name for p in fold.iterdir() if p.name.startswith("checkpoint")) == \
        ["checkpoint.safetensors", "checkpoint.safetensors.tmp"]
    assert read_progress(fold / "checkpoint.safetensors")["epoch"] == 1  # the old state, whole
    assert list(pd.read_csv(fold / "metrics.csv").epoch) == [1, 2]

    training.resume(out, progress=False)
    tensors_equal(fold / "model.safetensors", baseline.folder / "fold0" / "model.safetensors")
    tensors_equal(fold / "checkpoint.safetensors", baseline.folder / "fold0" / "checkpoint.safetensors")
    assert Run.open(out).load_checkpoint(0)["progress"] == baseline.load_checkpoint(0)["progress"]
    pd.testing.assert_frame_equal(metric_rows(out), metric_rows(baseline.folder))
    assert not list(out.rglob("*.tmp"))

    # A truncated checkpoint is a one-line error naming the file, not a traceback.
    whole = (fold / "checkpoint.safetensors").read_bytes()
    for cut in (7, len(whole) // 2, len(whole) - 1):
        (fold / "checkpoint.safetensors").write_bytes(whole[:cut])
        with pytest.raises(checkpoint.CheckpointError) as e:
            training.resume(out, progress=False)
        assert isinstance(e.value, SoundtagError) and "\n" not in str(e.value)
        assert str(e.value).startswith(f"{fold / 'checkpoint.safetensors'}: damaged checkpoint")
    capsys.readouterr()
    assert cli.main(["train", "--resume", str(out)]) == 2
    assert "damaged checkpoint" in error_line(capsys)


def test_resume_matches_with_sgd_lookahead_and_cosine(tiny, tmp_path):
    config = tiny_config(optim={"name": "sgd", "lookahead": True, "schedule": "cosine", "lr": 0.01})
    whole = training.train(datasets.read(tiny), config, tmp_path / "whole", progress=False)
    with pytest.raises(KeyboardInterrupt):
        training.train(datasets.read(tiny), config, tmp_path / "cut", progress=False, hooks=[InterruptInEpoch(3)])
    assert read_progress(tmp_path / "cut" / "fold0" / "checkpoint.safetensors")["epoch"] == 2
    training.resume(tmp_path / "cut", progress=False)
    tensors_equal(tmp_path / "cut" / "fold0" / "checkpoint.safetensors",
                  whole.folder / "fold0" / "checkpoint.safetensors")
    assert Run.open(tmp_path / "cut").load_checkpoint(0)["progress"] == whole.load_checkpoint(0)["progress"]
    pd.testing.assert_frame_equal(metric_rows(tmp_path / "cut"), metric_rows(whole.folder))


def test_lookahead_reports_the_scheduled_learning_rate_after_loading_a_state():
    config = OptimConfig(name="sgd", lookahead=True, schedule="cosine", lr=0.01, warmup=0.25)
    first = build_optimizer(torch.nn.Linear(2, 2).parameters(), config)
    build_schedule(first, config, 8)
    model = torch.nn.Linear(2, 2)
    again = build_optimizer(model.parameters(), config)
    schedule = build_schedule(again, config, 8)
    again.load_state_dict(first.state_dict())
    for _ in range(4):
        again.step()
        schedule.step()
    assert again.inner.param_groups[0]["lr"] == pytest.approx(schedule.get_last_lr()[0])
    assert again.param_groups[0]["lr"] == again.inner.param_groups[0]["lr"]


# ------------------------------------------------------------------ --init


def test_init_keeps_the_backbone_and_replaces_a_head_for_other_classes(baseline):
    source = load_file(str(baseline.folder / "fold0" / "model.safetensors"))
    model = models.create_model("cnn6", 6, n_mels=64, width=0.125)
    fresh_head = model.head.weight.detach().clone()
    training.load_init(model, baseline.folder, 0, [f"c{i}" for i in range(6)])
    state = model.state_dict()
    for name, tensor in source.items():
        if not name.startswith("head."):
            assert torch.equal(state[name], tensor), name
    assert state["head.weight"].shape == (6, 64) and torch.equal(state["head.weight"], fresh_head)

    same = models.create_model("cnn6", 4, n_mels=64, width=0.125)
    training.load_init(same, baseline.folder, 3, CLASSES4)  # fold 3 untrained: falls back to fold 0
    assert all(torch.equal(same.state_dict()[n], t) for n, t in source.items())


def test_init_overlap_counts_held_out_clips_the_init_weights_trained_on(baseline):
    table = baseline.read_clips()
    trained = baseline.trained_folds()
    assert training.init_overlap(baseline.folder, table, trained[0]) == 0  # the same folds: honest
    other = next(k for k in sorted(set(table.fold.tolist())) if k not in trained)
    held = int(table.validation(other).sum())
    assert held and training.init_overlap(baseline.folder, table, other) == held  # fold 0's weights saw them all


def test_init_run_on_other_classes_starts_from_the_source_backbone(baseline, esc, tmp_path):
    """With a negligible learning rate the trained weights stay the source's, head excepted."""
    config = tiny_config(epochs=1, folds="own", train_folds=[1], optim={"lr": 1e-12})
    run = training.train(datasets.read(esc), config, tmp_path / "run", init=baseline.folder, progress=False)
    assert run.classes == ESC_CLASSES
    source = load_file(str(baseline.folder / "fold0" / "model.safetensors"))
    trained = load_file(str(run.folder / "fold1" / "model.safetensors"))
    assert trained["head.weight"].shape == (3, 64)
    parameters = {n for n, _ in run.new_model().named_parameters()}
    for name in parameters - {"head.weight", "head.bias"}:
        torch.testing.assert_close(trained[name], source[name], atol=1e-8, rtol=0)


def test_resume_of_an_init_run_starts_unfinished_folds_from_the_init_weights(baseline, esc, tmp_path):
    config = tiny_config(epochs=1, folds="own", train_folds=[1, 2])
    whole = training.train(datasets.read(esc), config, tmp_path / "whole", init=baseline.folder, progress=False)
    with pytest.raises(KeyboardInterrupt):  # Ctrl-C in fold 2's first epoch
        training.train(datasets.read(esc), config, tmp_path / "cut", init=baseline.folder, progress=False,
                       hooks=[InterruptInEpoch(2)])
    assert Run.open(tmp_path / "cut").trained_folds() == [1]
    training.resume(tmp_path / "cut", progress=False)
    tensors_equal(tmp_path / "cut" / "fold1" / "model.safetensors", whole.folder / "fold1" / "model.safetensors")
    tensors_equal(tmp_path / "cut" / "fold2" / "model.safetensors", whole.folder / "fold2" / "model.safetensors")


def test_init_from_another_model_family_for_other_classes_is_a_run_error(baseline):
    model = models.create_model("mobilenetv2", 6, n_mels=64, width=0.25)
    with pytest.raises(RunError, match="does not match this config's"):
        training.load_init(model, baseline.folder, 0, [f"c{i}" for i in range(6)])


@pytest.mark.parametrize("name, params, classes", [
    ("cnn6", {"width": 0.25}, [f"c{i}" for i in range(6)]),
    ("cnn10", {"width": 0.125}, [f"c{i}" for i in range(6)]),
    ("mobilenetv2", {"width": 0.25}, CLASSES4),  # same classes: the head is kept and does not fit
])
def test_init_from_a_model_of_other_shapes_is_a_run_error(baseline, name, params, classes):
    """Regression: same-named tensors of other shapes raised torch's RuntimeError, not RunError."""
    model = models.create_model(name, len(classes), n_mels=64, **params)
    with pytest.raises(RunError, match="does not match"):
        training.load_init(model, baseline.folder, 0, classes)


def test_cli_init_from_a_run_of_another_model_is_an_error_message(baseline, esc, tmp_path, tiny_yaml, capsys):
    config = tiny_yaml
    args = ["train", str(esc), "--out", str(tmp_path / "run"), "--config", str(config), "--folds", "own",
            "--fold", "1", "--init", str(baseline.folder), "--model", "cnn10"]
    assert cli.main(args) == 2
    line = error_line(capsys)
    assert f"--init {baseline.folder}: its model (cnn6 {{'width': 0.125, 'dropout': 0.2}}) does not match" in line
    assert not (tmp_path / "run" / "fold1" / "model.safetensors").exists()


def test_init_from_a_folder_without_weights_is_a_run_error(tmp_path):
    model = models.create_model("cnn6", 4, n_mels=64, width=0.125)
    with pytest.raises(RunError, match="not a run folder"):
        training.load_init(model, tmp_path, 0, CLASSES4)


# ------------------------------------------------------------------ the train command


def test_cli_train_with_own_folds_refuses_to_overwrite_and_resumes(esc, tmp_path, tiny_yaml, capsys):
    config = tiny_yaml
    out = tmp_path / "run"
    args = ["train", str(esc), "--out", str(out), "--config", str(config), "--folds", "own", "--fold", "2",
            "--epochs", "1"]
    assert cli.main(args) == 0
    printed = capsys.readouterr().out
    assert "| fold | epoch kept | epochs | selection loss | held-out lwlrap | held-out map@3 | minutes |" in printed
    assert "| 2 | 1 | 1 |" in printed and "| out-of-fold (3 clips) |" in printed
    assert f"run: {out} (curves: {out / 'curves.png'})" in printed
    run = Run.open(out)
    assert run.trained_folds() == [2] and run.config.epochs == 1 and run.config.folds == "own"
    assert run.config.model == ModelConfig("cnn6", {**TINY_MODEL["params"], "dropout": 0.2})
    folds = run.read_clips()
    own = datasets.read(esc)
    assert folds.names == own.names and (folds.fold == own.fold).all()

    before = (out / "fold2" / "model.safetensors").read_bytes()
    assert cli.main(args) == 2
    assert "already exists; pass --force to overwrite it or --resume to continue it" in error_line(capsys)
    assert (out / "fold2" / "model.safetensors").read_bytes() == before

    assert cli.main(["train", "--resume", str(out)]) == 0  # a finished run: nothing left to train
    assert "| 2 | 1 | 1 |" in capsys.readouterr().out
    assert list(pd.read_csv(out / "fold2" / "metrics.csv").epoch) == [1]
    assert (out / "fold2" / "model.safetensors").read_bytes() == before

    assert cli.main([*args, "--force"]) == 0
    assert "| 2 | 1 | 1 |" in capsys.readouterr().out


def test_cli_train_needs_data_and_out(capsys):
    assert cli.main(["train"]) == 2
    assert "train needs DATA and --out RUN (or --resume RUN)" in error_line(capsys)


def test_cli_resume_of_a_missing_run_is_an_error(tmp_path, capsys):
    assert cli.main(["train", "--resume", str(tmp_path / "nowhere")]) == 2
    assert "not a run folder" in error_line(capsys)

"""Training must learn: a few epochs on six distinct classes of the bundled demo
set beat chance by a wide margin, and the speed settings (bf16, channels-last)
are really in effect inside the loop."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from helpers import DEMO, TINY

from soundtag import config, datasets, loop, metrics, train
from soundtag.clips import ClipTable
from soundtag.loop import Hook
from soundtag.predict import Tagger

pytestmark = pytest.mark.usefixtures("single_torch_thread")

SIX = ["Applause", "Bass_drum", "Flute", "Gunshot_or_gunfire", "Telephone", "Violin_or_fiddle"]
# chance: MAP@3 (1 + 1/2 + 1/3) / 6 ≈ 0.31, accuracy 1/6
LEARN = {"epochs": 8, "folds": 4, "model": {"name": "cnn6", "params": {"width": 0.25}}, "optim": {"lr": 0.003},
         "features": {"n_fft": 2048, "hop_length": 1024}}


def six_classes(split: str) -> tuple[datasets.Dataset, list[int]]:
    dataset = datasets.read(DEMO)
    columns = [dataset.classes.index(c) for c in SIX]
    part = dataset.subset(split)
    return part.select(part.targets[:, columns].sum(1) > 0), columns


@pytest.fixture(scope="module")
def learned(tmp_path_factory):
    part, columns = six_classes("train")
    table = ClipTable.from_dataset(part)
    table = dataclasses.replace(table, classes=SIX, targets=table.targets[:, columns])
    cfg = config.resolve("fast", overrides=config.merge(TINY, LEARN))
    return train.train(table, cfg, tmp_path_factory.mktemp("learn") / "run", progress=False)


def test_a_few_epochs_lower_the_training_loss(learned):
    history = learned.history(0)
    assert len(history) == 8
    assert history.train_loss.iloc[-1] < 0.7 * history.train_loss.iloc[0]


def test_a_few_epochs_beat_chance_on_validation_and_held_out_clips(learned):
    assert learned.summary()["folds"]["0"]["map@3"] >= 0.6
    test, columns = six_classes("test")
    scores, errors = Tagger.load([learned.folder], threads=1).tag_files(test.files, workers=1, progress=False)
    figures = metrics.evaluate(test.targets[:, columns], scores, SIX, False)
    assert not errors and len(test) == 24
    assert figures["map@3"] >= 0.55 and figures["accuracy"] >= 0.35


class Inspect(Hook):
    """Records what the network saw and returned in the first batch."""

    def __init__(self) -> None:
        self.seen: dict[str, object] = {}

    def batch_end(self, state, x, logits, loss) -> None:
        if not self.seen:
            conv = next(m for m in state.model.modules() if isinstance(m, torch.nn.Conv2d) and m.in_channels > 1)
            self.seen = {"logits": logits.dtype,
                         "weights": conv.weight.is_contiguous(memory_format=torch.channels_last),
                         "loss": loss.dtype}


@pytest.mark.parametrize("bf16, native, channels_last", [(True, True, True), (True, False, True),
                                                          (False, True, False)])
def test_bf16_and_channels_last_are_in_effect(tmp_path, monkeypatch, caplog, bf16, native, channels_last):
    """bf16 autocast runs where bfloat16 is native (forced here either way) and
    falls back to float32, with a warning, where it is not."""
    for module in (loop, train):
        monkeypatch.setattr(module, "native_bf16", lambda device: native)
    dataset = datasets.read(DEMO)
    cfg = config.resolve("fast", overrides=config.merge(TINY, {
        "epochs": 1, "epoch_clips": 16, "bf16": bf16, "channels_last": channels_last}))
    hook = Inspect()
    train.train(dataset, cfg, tmp_path / "run", progress=False, hooks=[hook])
    assert hook.seen["logits"] == (torch.bfloat16 if bf16 and native else torch.float32)
    assert hook.seen["loss"] == torch.float32
    assert hook.seen["weights"] is channels_last
    assert ("no native bfloat16" in caplog.text) is (bf16 and not native)


def test_the_held_out_fold_never_reaches_training(learned):
    clips = learned.read_clips()
    held = clips.validation(0)
    assert held.any() and not (clips.training(0) & held).any()
    assert np.isin(clips.origin[held], ["curated", "unverified"]).all()


@pytest.mark.parametrize("selection", ["inner", "last"])
def test_the_scoring_fold_never_reaches_model_selection(tmp_path, selection):
    """Scrambling the held-out fold's labels changes nothing but its figures."""
    table = ClipTable.from_dataset(datasets.read(DEMO).subset("train"))
    table.fold = np.arange(len(table)) % 4
    held = np.flatnonzero(table.fold == 0)
    scrambled = dataclasses.replace(table, targets=table.targets.copy())
    scrambled.targets[held] = np.roll(table.targets[held], 1, axis=1)
    cfg = config.resolve("fast", overrides=config.merge(TINY, {
        "epochs": 2, "epoch_clips": 48, "folds": "own", "train_folds": [0], "selection": selection}))
    runs = [train.train(t, cfg, tmp_path / name, progress=False)
            for name, t in (("plain", table), ("scrambled", scrambled))]
    first, second = (r.weights(0) for r in runs)
    assert all(torch.equal(first[n], second[n]) for n in first)
    watched = ["train_loss", "val_loss", "map@3"] if selection == "inner" else ["train_loss"]  # last: monitored only
    assert runs[0].history(0)[watched].equals(runs[1].history(0)[watched])
    assert runs[0].summary()["folds"]["0"]["map@3"] != runs[1].summary()["folds"]["0"]["map@3"]

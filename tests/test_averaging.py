"""Weight averaging: EMA and SWA against their formulas, the average kept as the
fold's weights (validated on the selection clips), and resuming a fold
mid-average exactly.

The end-to-end runs train a tiny network for three epochs of two batches of 8
clips on 32 curated and 24 noisy clips of the bundled multi-label demo set.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from helpers import TINY, InterruptInEpoch, small_noisy_set
from soundtag import checkpoint, datasets
from soundtag import train as training
from soundtag.averaging import EMA, SWA
from soundtag.clips import ClipTable
from soundtag.config import AverageConfig, TrainConfig, merge, resolve
from soundtag.distributed import Context
from soundtag.errors import ConfigError
from soundtag.loader import ClipSet
from soundtag.loop import EpochRecord, FoldState, evaluate
from soundtag.run import Run
from soundtag.splits import inner_split
from soundtag.store import extract
from soundtag.task import Task

pytestmark = pytest.mark.usefixtures("single_torch_thread")

SMALL = merge(TINY, {"epochs": 3, "batch_size": 8, "epoch_clips": 16, "folds": 3, "bf16": False,
                     "features": {"n_fft": 2048, "hop_length": 1024}})


def small_config(**changes) -> TrainConfig:
    return resolve("fast", overrides=merge(SMALL, changes))


@pytest.fixture(scope="module")
def small() -> datasets.Dataset:
    return small_noisy_set(small_config().features)


def floats(model: nn.Module) -> dict[str, torch.Tensor]:
    """A model's floating-point weights and buffers, copied."""
    return {n: t.detach().clone() for n, t in model.state_dict().items() if t.is_floating_point()}


def same_tensors(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert sorted(a) == sorted(b)
    different = [n for n in a if not torch.equal(a[n], b[n])]
    assert not different, f"{len(different)} tensor(s) differ, e.g. {different[:3]}"


def test_ema_follows_its_formula_from_its_start_step():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 2))
    config = TrainConfig(epochs=2, average=AverageConfig("ema", start=0.5, decay=0.8))
    state = FoldState(0, model, None, None, steps=4)
    hook = EMA(config, Task(True), None, None, Context())
    hook.start(state)
    snapshots = []
    for _ in range(8):  # two epochs of four steps; averaging starts at step 0.5 × 8 = 4
        loss = model(torch.randn(5, 3)).pow(2).mean()  # a step of plain gradient descent
        model.zero_grad()
        loss.backward()
        with torch.no_grad():
            for p in model.parameters():
                p -= 0.1 * p.grad
        snapshots.append(floats(model))
        hook.batch_end(state, None, None, loss)
    expected = dict(snapshots[4])  # the first averaged step copies the weights
    for snap in snapshots[5:]:
        expected = {n: 0.8 * expected[n] + 0.2 * snap[n] for n in expected}
    averaged = {n.removeprefix("module."): t for n, t in state.progress["average"].items() if t.is_floating_point()}
    assert sorted(averaged) == sorted(expected)  # BatchNorm statistics are averaged too
    for name, value in expected.items():
        assert torch.allclose(averaged[name], value, atol=1e-6), name
    assert int(state.progress["average"]["n_averaged"]) == 4
    # A fresh hook on the saved progress (a resumed fold) starts from the same average.
    again = EMA(config, Task(True), None, None, Context())
    again.start(FoldState(0, nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 2)), None, None, 4,
                          {**state.progress}))
    same_tensors(floats(again.averaged.module), floats(hook.averaged.module))
    # At the end the average becomes the model's weights.
    hook.end(state)
    for name, value in floats(model).items():
        assert torch.allclose(value, expected[name], atol=1e-6), name


def test_swa_is_the_mean_of_epoch_end_snapshots_with_batchnorm_recomputed(small):
    config = small_config(average={"kind": "swa", "start": 0.34})  # 0.34 × 3 epochs: epochs 2 and 3
    store = extract(small.files, config.features, progress=False)
    table = ClipTable.from_dataset(small)
    n = len(table)
    clips = ClipSet(store, np.arange(n), table.targets, table.weight, table.origin)
    val = ClipSet(store, np.arange(8), table.targets[:8], np.ones(8, np.float32), table.origin[:8])
    torch.manual_seed(0)
    model = config.create_model(len(small.classes))
    state = FoldState(0, model, None, None, steps=2)
    hook = SWA(config, Task(True), clips, val, Context())
    hook.start(state)
    snapshots = []
    for epoch in (1, 2, 3):
        with torch.no_grad():  # stands in for an epoch of training
            for p in model.parameters():
                p.add_(0.1 * torch.randn_like(p))
        snapshots.append({n: p.detach().clone() for n, p in model.named_parameters()})
        state.progress["epoch"] = epoch
        record = EpochRecord(epoch, 0.5, -1.0, -1.0, None, 0.01, 0.0, 0.0)
        hook.epoch_end(state, record)
        if epoch == 1:  # not averaged yet: the record keeps the model's own figures
            assert int(hook.averaged.n_averaged) == 0 and record.val_loss == -1.0
    mean = {n: (snapshots[1][n] + snapshots[2][n]) / 2 for n in snapshots[0]}
    for name, p in hook.averaged.module.named_parameters():
        assert torch.allclose(p, mean[name], atol=1e-6), name
    # BatchNorm statistics recomputed over an epoch of training batches (2), not the model's.
    norms = [m for m in hook.averaged.module.modules() if isinstance(m, nn.BatchNorm2d)]
    live = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert norms and all(int(m.num_batches_tracked) == 2 for m in norms)
    assert not torch.equal(norms[0].running_mean, live[0].running_mean)
    # The epoch's validation figures are the average's.
    loss, figure, scores = evaluate(hook.averaged.module, val, config, Task(True), torch.device("cpu"))
    assert (record.val_loss, record.figure) == (loss, figure) and np.array_equal(record.scores, scores)
    hook.end(state)
    same_tensors(floats(model), floats(hook.averaged.module))


def test_the_average_is_the_fold_weights_validated_on_the_selection_clips(small, tmp_path):
    # patience 0 would stop a fold at once: with an average, the whole schedule trains.
    config = small_config(patience=0, early_stop_from=0.0, selection="inner",
                          average={"kind": "ema", "start": 0.25, "decay": 0.5})
    run = training.train(small, config, tmp_path / "run", progress=False)
    history = run.history(0)
    assert list(history.epoch) == [1, 2, 3]
    summary = run.summary()["folds"]["0"]
    assert summary["best_epoch"] == 3 and summary["selection_lwlrap"] == pytest.approx(history.lwlrap.iloc[-1])
    # The weights kept are the average the checkpoint holds, not the last weights trained.
    saved = run.load_checkpoint(0)
    average = {n.removeprefix("module."): t for n, t in saved["progress"]["average"].items() if n != "n_averaged"}
    same_tensors(run.weights(0), average)
    assert any(not torch.equal(average[n], saved["model"][n]) for n in average)
    # metrics.csv's figure of the last epoch is the average's on the selection clips.
    table = run.read_clips()
    select = inner_split(table, table.training(0), config.inner_fraction, config.seed)
    store = extract(table.files, config.features, progress=False)
    clips = ClipSet(store, np.flatnonzero(select), table.targets[select], np.ones(int(select.sum()), np.float32))
    loss, figure, _ = evaluate(run.load_model(0), clips, config, run.task, torch.device("cpu"))
    assert history.lwlrap.iloc[-1] == pytest.approx(figure, abs=1e-5)
    assert history.val_loss.iloc[-1] == pytest.approx(loss, abs=1e-5)


@pytest.mark.parametrize("average", [{"kind": "ema", "start": 0.5, "decay": 0.7},
                                     {"kind": "swa", "start": 0.0, "decay": 0.999}])
def test_resume_mid_average_matches_the_uninterrupted_run(small, tmp_path, average):
    config = small_config(average=average, selection="last" if average["kind"] == "swa" else "inner")
    whole = training.train(small, config, tmp_path / "whole", progress=False)
    cut = tmp_path / "cut"
    with pytest.raises(KeyboardInterrupt):
        training.train(small, config, cut, progress=False, hooks=[InterruptInEpoch(3)])
    progress = checkpoint.load(cut / "fold0" / "checkpoint.safetensors")["progress"]
    assert progress["epoch"] == 2 and int(progress["average"]["n_averaged"]) > 0  # averaging had begun
    training.resume(cut, progress=False)
    for name in ("model.safetensors", "checkpoint.safetensors"):
        same_tensors(load_file(str(cut / "fold0" / name)), load_file(str(whole.folder / "fold0" / name)))
    timing = ["clips_per_s", "seconds"]
    pd.testing.assert_frame_equal(Run.open(cut).history(0).drop(columns=timing), whole.history(0).drop(columns=timing))
    assert np.array_equal(np.load(cut / "fold0" / "oof.npy"), np.load(whole.folder / "fold0" / "oof.npy"))


@pytest.mark.parametrize("changes, words", [
    ({"average": {"kind": "polyak"}}, "unknown average 'polyak'; valid averages: ema, swa"),
    ({"average": {"start": 1.0}}, "average.start must be at least 0 and below 1, not 1.0"),
    ({"average": {"decay": 1}}, "average.decay must be between 0 and 1, not 1"),
    ({"average": {"kind": "ema", "every": 2}}, "config.average: unknown option(s) every; valid: decay, kind, start"),
    ({"average": "ema"}, "config.average must be a mapping or null, not 'ema'"),
])
def test_average_options_are_checked_before_training_with_one_line_errors(changes, words):
    with pytest.raises(ConfigError) as e:
        small_config(**changes)
    assert str(e.value) == words

"""Training on noisy labels: per-origin loss weights, per-batch shares of
origins, soft bootstrapping and the Lq loss, and a loss of its own for the
clips of one origin (`origin_loss`).

The end-to-end runs train a tiny network for two short epochs on 32 curated
and 24 noisy clips of the bundled multi-label demo set.
"""

from __future__ import annotations

import math
from collections import Counter

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml

from helpers import MULTI, TINY, error_line, small_noisy_set, warm_cache
from soundtag import cli, datasets, loop, task
from soundtag import train as training
from soundtag.clips import ClipTable
from soundtag.config import CropConfig, TrainConfig, merge, resolve
from soundtag.errors import ConfigError, DataError
from soundtag.loader import ClipSet, check_shares, share_counts, steps_per_epoch, train_batches
from soundtag.loop import batch_loss
from soundtag.registry import Registry
from soundtag.run import Run
from soundtag.store import extract
from soundtag.task import Task, check_loss

pytestmark = pytest.mark.usefixtures("single_torch_thread")

# Two epochs of two batches of 8 clips, the half-frame-rate front end.
SMALL = merge(TINY, {"epochs": 2, "batch_size": 8, "epoch_clips": 16, "folds": 3, "bf16": False,
                     "features": {"n_fft": 2048, "hop_length": 1024}})


def small_config(**changes) -> TrainConfig:
    return resolve("fast", overrides=merge(SMALL, changes))


SMALL_CROP = CropConfig()


@pytest.fixture(scope="module")
def small() -> datasets.Dataset:
    return small_noisy_set(small_config().features)


@pytest.fixture(scope="module")
def small_clips(small) -> ClipSet:
    """The small set's clips with their origins; weights carry each clip's position."""
    store = extract(small.files, small_config().features, progress=False)
    n = len(store)
    return ClipSet(store, np.arange(n), small.targets.astype(np.float32), np.arange(n, dtype=np.float32),
                   ClipTable.from_dataset(small).origin)


ORIGINS = "curated, unverified, noisy, pseudo, selected"


def sigmoid(x: float) -> float:
    return 1 / (1 + math.exp(-x))


def softmax(xs: list[float]) -> list[float]:
    total = sum(math.exp(x) for x in xs)
    return [math.exp(x) / total for x in xs]


# ------------------------------------------------------------------ losses


def test_lq_loss_matches_hand_computed_values():
    single, multi = Task(False), Task(True)
    logits = torch.tensor([[1.0, 0.0, -1.0]])
    one_hot = torch.tensor([[1.0, 0.0, 0.0]])
    p = softmax([1.0, 0.0, -1.0])
    lq = single.clip_losses(logits, one_hot, name="lq", params={"q": 0.5})
    assert lq.item() == pytest.approx((1 - p[0] ** 0.5) / 0.5, rel=1e-6)
    # q = 1 is the mean absolute error; q → 0 tends to cross-entropy.
    assert single.clip_losses(logits, one_hot, name="lq", params={"q": 1.0}).item() == pytest.approx(1 - p[0], rel=1e-6)
    assert single.clip_losses(logits, one_hot, name="lq", params={"q": 1e-4}).item() == \
        pytest.approx(-math.log(p[0]), rel=1e-3)
    # Label smoothing moves the targets towards uniform before the loss.
    smooth = [0.9 + 0.1 / 3, 0.1 / 3, 0.1 / 3]
    expected = sum(t * (1 - pc ** 0.5) / 0.5 for t, pc in zip(smooth, p))
    assert single.clip_losses(logits, one_hot, 0.1, "lq", {"q": 0.5}).item() == pytest.approx(expected, rel=1e-6)
    # Multi-label: each class on its sigmoid, p of a positive and 1 − p of a negative, averaged.
    two = torch.tensor([[2.0, -1.0]])
    got = multi.clip_losses(two, torch.tensor([[1.0, 0.0]]), name="lq", params={"q": 0.5})
    by_hand = ((1 - sigmoid(2.0) ** 0.5) / 0.5 + (1 - (1 - sigmoid(-1.0)) ** 0.5) / 0.5) / 2
    assert got.item() == pytest.approx(by_hand, rel=1e-6)
    # Bounded, and with a finite gradient even for a logit far beyond float32's sigmoid.
    far = torch.tensor([[-200.0, 0.0]], requires_grad=True)
    loss = multi.loss(far, torch.tensor([[1.0, 0.0]]), name="lq", params={"q": 0.7})
    loss.backward()
    assert loss.item() <= 1 / 0.7 and torch.isfinite(far.grad).all()


def soft_bootstrap_single(z: list[float], y: list[float], beta: float) -> float:
    """−Σ (beta·y + (1 − beta)·p) log p, p = softmax(z), by hand."""
    p = softmax(z)
    return -sum((beta * t + (1 - beta) * pc) * math.log(pc) for t, pc in zip(y, p))


def soft_bootstrap_multi(z: list[float], y: list[float], beta: float) -> float:
    """Per-class BCE against beta·y + (1 − beta)·sigmoid(z), averaged, by hand."""
    s = [sigmoid(v) for v in z]
    t = [beta * yc + (1 - beta) * sc for yc, sc in zip(y, s)]
    return sum(-(tc * math.log(sc) + (1 - tc) * math.log(1 - sc)) for tc, sc in zip(t, s)) / len(z)


def numeric_gradient(f, z: list[float], h: float = 1e-5) -> list[float]:
    return [(f(z[:i] + [v + h] + z[i + 1:]) - f(z[:i] + [v - h] + z[i + 1:])) / (2 * h) for i, v in enumerate(z)]


@pytest.mark.parametrize("multilabel, z, y", [(False, [1.0, 0.0, -1.0], [0.0, 1.0, 0.0]),
                                              (True, [2.0, -1.0], [0.0, 1.0])])
def test_bootstrap_soft_matches_its_formula_and_gradient(multilabel, z, y):
    beta = 0.6
    by_hand = soft_bootstrap_multi if multilabel else soft_bootstrap_single
    logits = torch.tensor([z], dtype=torch.float64, requires_grad=True)
    target = torch.tensor([y], dtype=torch.float64)
    loss = Task(multilabel).clip_losses(logits, target, name="bootstrap_soft", params={"beta": beta})
    assert loss.item() == pytest.approx(by_hand(z, y, beta), rel=1e-9)
    loss.sum().backward()
    expected = numeric_gradient(lambda v: by_hand(v, y, beta), z)
    assert logits.grad[0].tolist() == pytest.approx(expected, abs=1e-6)
    # the prediction in the target is not a constant: the gradient is not merely beta times the plain loss's
    plain = logits.detach().clone().requires_grad_()
    Task(multilabel).clip_losses(plain, target).sum().backward()
    assert not torch.allclose(logits.grad, beta * plain.grad, atol=1e-3)


@pytest.mark.parametrize("multilabel", [True, False])
def test_bootstrap_with_beta_1_is_the_plain_loss(multilabel):
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(6, 5, generator=gen)
    y = (torch.rand(6, 5, generator=gen) > 0.6).float() if multilabel else torch.eye(5)[[0, 3, 1, 4, 2, 2]]
    w = torch.tensor([1.0, 0.5, 2.0, 1.0, 0.0, 1.0])
    t = Task(multilabel)
    for smoothing in (0.0, 0.1):
        plain = t.loss(logits, y, w, smoothing)
        assert torch.allclose(t.loss(logits, y, w, smoothing, "bootstrap_soft", {"beta": 1.0}), plain, atol=1e-7)
        assert not torch.allclose(t.loss(logits, y, w, smoothing, "bootstrap_soft", {"beta": 0.5}), plain)


def test_loss_parameter_values_are_checked_before_training():
    check_loss("bootstrap_soft", {"beta": 0.0})
    check_loss("lq", {"q": 1})
    for name, params, words in [("bootstrap_soft", {"beta": 1.5}, "beta must be between 0 and 1, not 1.5"),
                                ("lq", {"q": 0.0}, "q must be above 0 and at most 1, not 0.0"),
                                ("lq", {"p": 0.5}, r"got unknown parameter\(s\) p; accepted: q$")]:
        with pytest.raises(ConfigError, match=f"^loss '{name}'.*{words}") as e:
            TrainConfig(loss=name, loss_params=params).validate()
        assert "\n" not in str(e.value)


# ------------------------------------------------------------------ a loss per origin


def test_origin_loss_applies_only_to_the_clips_of_its_origin(monkeypatch):
    losses = Registry("loss", plural="losses")  # a copy, so that the test's losses are gone after it
    for name in task.LOSSES:
        losses.add(name, task.LOSSES.get(name))
    monkeypatch.setattr(task, "LOSSES", losses)
    for name, value in (("ones", 1.0), ("sevens", 7.0), ("threes", 3.0)):
        losses.add(name, lambda logits, y, smoothing=0.0, value=value: torch.full((len(y),), value))
    config = TrainConfig(loss="ones", origin_loss={"noisy": {"name": "sevens"}, "pseudo": {"name": "threes"}})
    config.validate()
    origins = np.array(["curated", "noisy", "pseudo", "noisy", "unverified"])
    w = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0])
    logits, y = torch.zeros(5, 2), torch.zeros(5, 2)
    per_clip = (1 * 1 + 7 * 2 + 3 * 3 + 7 * 4 + 1 * 5) / 15
    assert batch_loss(Task(True), config, logits, [], y, w, origins).item() == pytest.approx(per_clip)
    # Extra heads (auxcnn) mix their losses by origin the same way.
    with_head = batch_loss(Task(True), config, logits, [(0.5, logits)], y, w, origins)
    assert with_head.item() == pytest.approx(1.5 * per_clip)
    # A batch without clips of the origins named: the main loss alone.
    assert batch_loss(Task(True), config, logits, [], y, w, np.array(["curated"] * 5)).item() == 1.0


def test_origin_loss_mixes_real_losses_by_origin():
    gen = torch.Generator().manual_seed(1)
    logits = torch.randn(4, 3, generator=gen)
    y = (torch.rand(4, 3, generator=gen) > 0.5).float()
    w = torch.tensor([1.0, 0.5, 0.5, 2.0])
    origins = np.array(["curated", "noisy", "curated", "noisy"])
    spec = {"name": "bootstrap_soft", "params": {"beta": 0.7}}
    config = TrainConfig(label_smoothing=0.1, origin_loss={"noisy": spec})
    smoothed = y * 0.9 + 0.05
    target = 0.7 * y + 0.3 * torch.sigmoid(logits)
    bce = F.binary_cross_entropy_with_logits(logits, smoothed, reduction="none").mean(1)
    boot = F.binary_cross_entropy_with_logits(logits, target * 0.9 + 0.05, reduction="none").mean(1)
    per_clip = torch.where(torch.tensor([False, True, False, True]), boot, bce)
    got = batch_loss(Task(True), config, logits, [], y, w, origins)
    assert torch.allclose(got, (per_clip * w).sum() / w.sum(), atol=1e-6)
    assert not torch.allclose(got, batch_loss(Task(True), TrainConfig(label_smoothing=0.1), logits, [], y, w))


# ------------------------------------------------------------------ batch shares


def test_share_counts_round_to_whole_clips_that_fill_the_batch():
    assert share_counts({"curated": 0.5, "noisy": 0.5}, 16) == {"curated": 8, "noisy": 8}
    # 8, 4.8 and 3.2 clips: the largest remainder rounds up; the counts come in ORIGINS order.
    assert list(share_counts({"pseudo": 0.2, "noisy": 0.3, "curated": 0.5}, 16).items()) == \
        [("curated", 8), ("noisy", 5), ("pseudo", 3)]
    rng = np.random.default_rng(0)
    for _ in range(200):
        shares = dict(zip(["curated", "noisy", "pseudo"], rng.dirichlet([1, 1, 1])))
        size = int(rng.integers(3, 100))
        counts = share_counts(shares, size)
        assert sum(counts.values()) == size
        assert all(abs(counts[o] - shares[o] * size) < 1 for o in shares)


def test_batch_shares_give_every_batch_its_share_without_replacement(small_clips):
    clips = small_clips
    origin = clips.origins
    curated, noisy = np.flatnonzero(origin == "curated"), np.flatnonzero(origin == "noisy")
    assert (len(curated), len(noisy)) == (32, 24)
    shares = {"curated": 0.25, "noisy": 0.75}
    batches = list(train_batches(clips, 8, SMALL_CROP, np.random.default_rng(3), shares=shares))
    assert len(batches) == steps_per_epoch(len(clips), 8) == 7  # as many batches as a plain epoch
    drawn = {"curated": [], "noisy": []}
    for x, y, w, idx in batches:
        assert np.array_equal(w.numpy().astype(int), idx) and torch.equal(y, torch.from_numpy(clips.targets[idx]))
        assert Counter(origin[idx]) == {"curated": 2, "noisy": 6}
        for o in drawn:
            drawn[o].extend(idx[origin[idx] == o])
    # Without replacement within an epoch: 14 distinct curated clips; the 42 noisy draws wrap
    # around the 24 noisy clips once, every one drawn before any is drawn again.
    assert len(set(drawn["curated"])) == 14 and set(drawn["curated"]) <= set(curated)
    assert sorted(drawn["noisy"][:24]) == list(noisy) and drawn["noisy"][24:] == drawn["noisy"][:18]
    # Deterministic from the epoch's generator; another seed draws other clips.
    again = list(train_batches(clips, 8, SMALL_CROP, np.random.default_rng(3), shares=shares))
    assert all(np.array_equal(a[3], b[3]) and torch.equal(a[0], b[0]) for a, b in zip(batches, again))
    other = list(train_batches(clips, 8, SMALL_CROP, np.random.default_rng(4), shares=shares))
    assert any(not np.array_equal(a[3], b[3]) for a, b in zip(batches, other))
    # Two ranks take disjoint clips of each origin at every step; epoch_clips sets the batches an epoch.
    ranks = [list(train_batches(clips, 8, SMALL_CROP, np.random.default_rng(5), r, 2, shares=shares)) for r in (0, 1)]
    for (_, _, _, a), (_, _, _, b) in zip(*ranks):
        assert Counter(origin[a]) == Counter(origin[b]) == {"curated": 2, "noisy": 6} and not set(a) & set(b)
    assert len(list(train_batches(clips, 8, SMALL_CROP, np.random.default_rng(0), limit=16, shares=shares))) == 2


def test_batch_shares_asking_for_an_origin_absent_from_training_are_an_error(small, small_clips, tmp_path, caplog):
    with pytest.raises(DataError, match="batch_shares asks for pseudo clips, but the training set has none; "
                                        "its training clips are curated, noisy$"):
        training.train(small, small_config(batch_shares={"curated": 0.5, "pseudo": 0.5}), tmp_path / "run",
                       progress=False)
    assert not (tmp_path / "run").exists()
    with pytest.raises(DataError, match="asks for noisy clips, but the training set has none"):
        training.train(small, small_config(noisy="exclude", batch_shares={"curated": 0.5, "noisy": 0.5}),
                       tmp_path / "run", progress=False)
    # Clips of an origin no share names are not drawn: a warning says how many.
    check_shares(small_clips.origins, {"curated": 1.0}, "fold 0")
    assert "batch_shares names no share for fold 0's 24 noisy clip(s): they are not trained on" in caplog.text


# ------------------------------------------------------------------ origin weights


def test_origin_weights_multiply_table_weights_and_noisy_weight_is_their_noisy_entry(small):
    table = ClipTable.from_dataset(small)
    table.origin[:4] = "pseudo"
    table.weight[:4] = 0.8  # e.g. a pseudo-label's confidence
    weights = training.training_table(table, small_config(origin_weights={"pseudo": 0.5, "noisy": 0.25}))[0].weight
    expected = np.where(table.origin == "pseudo", 0.4, np.where(table.origin == "noisy", 0.25, 1.0))
    assert weights.dtype == np.float32 and np.allclose(weights, expected) and (table.weight[:4] == 0.8).all()
    # noisy_weight is the same entry: either way, and both when they agree, give the same weights.
    by_noisy_weight = training.training_table(table, small_config(noisy_weight=0.25, origin_weights={"pseudo": 0.5}))
    both = training.training_table(table, small_config(noisy_weight=0.25,
                                                       origin_weights={"pseudo": 0.5, "noisy": 0.25}))
    assert np.array_equal(by_noisy_weight[0].weight, weights) and np.array_equal(both[0].weight, weights)
    with pytest.raises(ConfigError, match=r"^noisy_weight \(0.5\) and origin_weights.noisy \(0.25\) both set"):
        small_config(noisy_weight=0.5, origin_weights={"noisy": 0.25})
    # Not given: the table's weights as they were.
    assert np.array_equal(training.training_table(table, small_config())[0].weight, table.weight)


def test_training_with_every_noisy_option_draws_shares_and_weights_each_batch(small, tmp_path, monkeypatch):
    seen = []
    real = loop.batch_loss

    def spy(task_, config, logits, extra, y, w, origins=None):
        seen.append((origins, w.numpy().copy()))
        return real(task_, config, logits, extra, y, w, origins)

    monkeypatch.setattr(loop, "batch_loss", spy)
    config = small_config(batch_shares={"curated": 0.75, "noisy": 0.25}, origin_weights={"noisy": 0.5},
                          origin_loss={"noisy": {"name": "bootstrap_soft", "params": {"beta": 0.7}}})
    run = training.train(small, config, tmp_path / "run", progress=False)
    assert len(seen) == 2 * 2  # two epochs of two batches
    for origins, w in seen:  # every batch: 6 curated clips of weight 1 and 2 noisy ones of weight 0.5
        assert Counter(origins) == {"curated": 6, "noisy": 2}
        assert np.array_equal(w, np.where(origins == "noisy", 0.5, 1.0).astype(np.float32))
    table = run.read_clips()
    assert np.array_equal(table.weight, np.where(table.origin == "noisy", 0.5, 1.0).astype(np.float32))
    saved = Run.open(run.folder).config
    assert saved.batch_shares == {"curated": 0.75, "noisy": 0.25} and saved.origin_loss == config.origin_loss
    assert np.isfinite(run.history(0)[["train_loss", "val_loss"]].to_numpy()).all()


def test_cli_trains_with_the_options_of_a_config_file(tmp_path, capsys):
    options = merge(SMALL, {"epochs": 1, "origin_weights": {"noisy": 0.5},
                            "batch_shares": {"curated": 0.5, "noisy": 0.5},
                            "origin_loss": {"noisy": {"name": "lq", "params": {"q": 0.7}}},
                            "average": {"kind": "swa", "start": 0.0}})
    path = tmp_path / "noisy.yaml"
    path.write_text(yaml.safe_dump(options))
    warm_cache(datasets.read(MULTI).subset("train").files, small_config().features)
    out = tmp_path / "run"
    assert cli.main(["train", str(MULTI), "--out", str(out), "--config", str(path)]) == 0
    assert "| fold | epoch kept |" in capsys.readouterr().out
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert saved["average"] == {"kind": "swa", "start": 0.0, "decay": 0.999}
    assert saved["origin_loss"] == {"noisy": {"name": "lq", "params": {"q": 0.7}}}

    path.write_text(yaml.safe_dump({**options, "batch_shares": {"curated": 0.5, "noisy": 0.6}}))
    assert cli.main(["train", str(MULTI), "--out", str(tmp_path / "bad"), "--config", str(path)]) == 2
    assert error_line(capsys) == "error: batch_shares must add up to 1, not 1.1"
    assert not (tmp_path / "bad").exists()


@pytest.mark.parametrize("changes, words", [
    ({"origin_weights": {"cleaned": 0.5}}, f"unknown origin 'cleaned' in origin_weights; valid: {ORIGINS}"),
    ({"origin_weights": {"noisy": 0}}, "origin_weights.noisy must be above 0, not 0"),
    ({"origin_weights": {"noisy": "half"}}, "config.origin_weights must be a mapping, not {'noisy': 'half'}"),
    ({"batch_shares": {"curated": 0.5, "noise": 0.5}}, f"unknown origin 'noise' in batch_shares; valid: {ORIGINS}"),
    ({"batch_shares": {"curated": 0.7, "noisy": 0.2}}, "batch_shares must add up to 1, not 0.9"),
    ({"batch_shares": {"curated": 1.05, "noisy": -0.05}}, "batch_shares.noisy must be above 0, not -0.05"),
    ({"batch_shares": {"curated": 0.95, "noisy": 0.05}}, "batch_shares: noisy's share 0.05 of batch_size 8 is less "
                                                         "than one clip"),
    ({"origin_loss": {"noisy": {"name": "huber"}}}, "origin_loss.noisy: unknown loss 'huber'; valid losses: bce, "
                                                    "bootstrap_soft, cross_entropy, lq"),
    ({"origin_loss": {"noisy": {"name": "lq", "params": {"q": 2}}}},
     "origin_loss.noisy: loss 'lq': q must be above 0 and at most 1, not 2"),
    ({"origin_loss": {"noisy": {"loss": "lq"}}}, "origin_loss.noisy must be {name: LOSS, params: {...}} "
                                                 "(params optional), not {'loss': 'lq'}"),
    ({"origin_loss": {"noisy": "lq"}}, "config.origin_loss must be a mapping, not {'noisy': 'lq'}"),
    ({"origin_loss": {"web": {"name": "lq"}}}, f"unknown origin 'web' in origin_loss; valid: {ORIGINS}"),
])
def test_noisy_options_are_checked_before_training_with_one_line_errors(changes, words):
    with pytest.raises(ConfigError) as e:
        small_config(**changes)
    assert str(e.value) == words

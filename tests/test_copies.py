"""Offline augmentation copies: the variants and their config, their features in
the store (computed once, keyed apart), their rows in the clip table (never
across folds), and a tiny training with copies, its resume and its skipped clips."""

from __future__ import annotations

import dataclasses
import re
import shutil
from pathlib import Path

import librosa
import numpy as np
import pandas as pd
import pytest
import torch
from safetensors.torch import load_file

from helpers import DEMO, TINY, error_line
from soundtag import audio, cli, config, copies, datasets, features, loop, store
from soundtag import train as training
from soundtag.clips import COLUMNS, ClipTable
from soundtag.config import merge
from soundtag.copies import Variant
from soundtag.errors import ConfigError, DataError
from soundtag.run import Run
from soundtag.splits import assign_folds

pytestmark = pytest.mark.usefixtures("single_torch_thread")

CONFIG = features.FeatureConfig()
CLIPS = [str(p) for p in sorted((DEMO / "audio_train").glob("*.ogg"))[:3]]
PITCH, STRETCH = Variant(pitch=2), Variant(stretch=0.9)
CLASSES4 = ["Acoustic_guitar", "Applause", "Bass_drum", "Cello"]


def computed(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, str]]:
    """(file, variant key) of every clip the store computes from now on (in-process)."""
    seen: list[tuple[str, str]] = []
    compute_one = store._compute_one

    def counting(job):
        seen.append((job[1], job[4].key() if job[4] else ""))
        return compute_one(job)

    monkeypatch.setattr(store, "_compute_one", counting)
    return seen


def extract(files, cache_dir: Path, variants=None) -> store.FeatureStore:
    return store.extract(files, CONFIG, cache_dir, workers=1, progress=False, variants=variants)


def warm_copies(files, cfg: config.TrainConfig) -> None:
    """The clips and their copies computed in this process, where training will find them: a worker
    pool costs seconds of start-up per test (each worker loading librosa's phase vocoder)."""
    files = [str(f) for f in files]
    variants = [None, *copies.variants(cfg.copies)]
    store.extract([f for _ in variants for f in files], cfg.features, workers=1, progress=False,
                  variants=[v for v in variants for _ in files])


def demo_set(root: Path, per_class: int = 8) -> Path:
    """An FSDKaggle2018-layout set of the first `per_class` demo clips of four classes."""
    table = pd.read_csv(DEMO / "train.csv")
    rows = table[table.label.isin(CLASSES4)].groupby("label").head(per_class)
    (root / "audio_train").mkdir(parents=True)
    for name in rows.fname:
        shutil.copy(DEMO / "audio_train" / name, root / "audio_train" / name)
    rows.to_csv(root / "train.csv", index=False)
    return root


def tiny(**changes) -> config.TrainConfig:
    return config.resolve("fast", overrides=merge(TINY, {"epochs": 2, "batch_size": 8, "bf16": False, **changes}))


# ------------------------------------------------------------------ variants


def test_a_variant_is_librosas_pitch_shift_or_time_stretch_and_both_at_once_one_stretch():
    wave = audio.load(CLIPS[1], 44100)
    assert np.array_equal(PITCH.apply(wave, 44100), librosa.effects.pitch_shift(wave, sr=44100, n_steps=2))
    assert np.array_equal(STRETCH.apply(wave, 44100), librosa.effects.time_stretch(wave, rate=0.9))
    both = Variant(pitch=-1, stretch=1.1).apply(wave, 44100)
    assert both.dtype == np.float32 and len(both) == round(len(wave) / 1.1)
    # an octave down and 10% faster: a 1 s tone of 1000 Hz becomes 0.91 s of 500 Hz
    tone = Variant(pitch=-12, stretch=1.1).apply(np.sin(2 * np.pi * 1000 * np.arange(22050) / 22050), 22050)
    assert len(tone) == 20045 and abs(np.abs(np.fft.rfft(tone)).argmax() * 22050 / len(tone) - 500) < 5
    # keys are canonical and read back
    assert [v.key() for v in (PITCH, STRETCH, Variant(-1.5, 1.1), Variant(2.0))] == [
        "pitch=2", "stretch=0.9", "pitch=-1.5,stretch=1.1", "pitch=2"]
    assert Variant.parse("pitch=-1.5,stretch=1.1") == Variant(-1.5, 1.1)
    with pytest.raises(DataError, match="clip variant 'tempo=2' is not of the form"):
        Variant.parse("tempo=2")


@pytest.mark.parametrize("spec, message", [
    ({"copies": [{"pich": 2}]}, r"copies\[0\]: unknown option\(s\) pich; valid: pitch, stretch"),
    ({"copies": [{"pitch": 2}, {"pitch": 13}]}, r"copies\[1\]\.pitch must be a number from -12 to 12 semitones"),
    ({"copies": [{"stretch": 0}]}, r"copies\[0\]\.stretch must be a number from 0\.5 to 2"),
    ({"copies": [{"pitch": 0, "stretch": 1}]}, r"copies\[0\] is the clip itself"),
    ({"copies": [{"pitch": 2}, {"pitch": 2.0}]}, r"copies\[1\] repeats copies\[0\] \(pitch=2\)"),
    ({"copies": [{}]}, r"copies\[0\] must be a mapping with pitch"),
    ({"copies": {"pitch": 2}}, r"copies must be a list"),
])
def test_copies_config_errors_are_one_line(spec, message, tmp_path, capsys):
    with pytest.raises(ConfigError, match=message):
        config.resolve("fast", overrides=spec)
    with pytest.raises(ConfigError, match=message):  # also a config built in Python
        dataclasses.replace(config.resolve("fast"), copies=spec["copies"]).validate()
    path = tmp_path / "copies.yaml"
    path.write_text(f"copies: {spec['copies']!r}\n".replace("'", ""))
    assert cli.main(["train", str(DEMO), "--out", str(tmp_path / "run"), "--config", str(path)]) == 2
    assert re.search(message, error_line(capsys))
    assert not (tmp_path / "run").exists()


# ------------------------------------------------------------------ the store


def test_a_copys_features_differ_from_the_sources_and_are_computed_once(cache_dir, monkeypatch):
    seen = computed(monkeypatch)
    first = extract(CLIPS * 2, cache_dir, [None] * 3 + [PITCH] * 3)
    assert sorted(seen) == sorted([(f, "") for f in CLIPS] + [(f, "pitch=2") for f in CLIPS])
    for i, path in enumerate(CLIPS):
        source, copy = first[i], first[i + 3]
        assert copy.shape == source.shape and not np.allclose(copy, source, atol=1.0)
        expected = features.compute(PITCH.apply(audio.load(path, 44100), 44100), CONFIG).astype(np.float16)
        assert np.array_equal(copy, expected)
    seen.clear()
    again = extract(CLIPS * 2, cache_dir, [None] * 3 + [PITCH] * 3)
    assert seen == [] and all(np.array_equal(again[i], first[i]) for i in range(6))

    # each variant is a clip of its own: another one computes only itself
    stretched = extract(CLIPS, cache_dir, [STRETCH] * 3)
    assert sorted(seen) == sorted((f, "stretch=0.9") for f in CLIPS)
    for i in range(3):
        assert stretched[i].shape[1] == CONFIG.frames(round(len(audio.load(CLIPS[i], 44100)) / 0.9))
    seen.clear()
    mixed = extract(CLIPS[:1] * 3, cache_dir, [STRETCH, None, PITCH])
    assert seen == [] and np.array_equal(mixed[0], stretched[0]) and np.array_equal(mixed[1], first[0])
    assert np.array_equal(mixed[2], first[3]) and len(store.Snapshot.read(first.folder).entries) == 9
    # and without variants, the keys are the files' own
    assert store.variant_key("abc", None) == "abc" and store.variant_key("abc", PITCH) != "abc"


def test_copies_of_a_broken_clip_are_skipped_with_the_reason_and_not_retried(cache_dir, tmp_path, monkeypatch):
    broken = tmp_path / "broken.ogg"
    broken.write_text("not audio")
    files = [str(broken), CLIPS[0]] * 2
    result = extract(files, cache_dir, [PITCH, PITCH, STRETCH, None])
    assert result.ok.tolist() == [False, True, False, True]
    failures = result.failures()
    assert list(failures) == [f"{broken} [pitch=2]", f"{broken} [stretch=0.9]"]
    assert all(reason.startswith("not readable as audio") for reason in failures.values())
    seen = computed(monkeypatch)
    assert extract(files, cache_dir, [PITCH, PITCH, STRETCH, None]).failures() == failures and seen == []

    # a clip that decodes but cannot be remade is recorded too, and nothing else fails
    def refuse(self, wave, sample_rate):
        raise ValueError("too short to stretch")

    monkeypatch.setattr(Variant, "apply", refuse)
    refused = extract(CLIPS[1:3], cache_dir, [Variant(pitch=-3), None])
    assert refused.ok.tolist() == [False, True]
    assert refused.failures() == {f"{CLIPS[1]} [pitch=-3]": "its copy pitch=-3 cannot be made (too short to stretch)"}


# ------------------------------------------------------------------ the clip table


def folded(origin: str = "") -> ClipTable:
    """The demo set's training clips in five folds (all of one origin, if given)."""
    table = ClipTable.from_dataset(datasets.read(DEMO).subset("train"))
    if origin:
        table = dataclasses.replace(table, origin=np.full(len(table), origin, table.origin.dtype))
    table.fold = assign_folds(table, 5, 0)
    return table


@pytest.mark.parametrize("origin", ["", "noisy"])
def test_copies_follow_their_source_and_never_cross_folds(origin):
    table = folded(origin)
    made = copies.add(table, [PITCH, STRETCH])
    n = len(table)
    assert len(made) == 3 * n and made.variant == [""] * n + ["pitch=2"] * n + ["stretch=0.9"] * n
    assert made.is_copy[n:].all() and not made.is_copy[:n].any() and made.files[n:] == table.files * 2
    for name in ("fold", "weight", "targets", "origin"):
        assert np.array_equal(getattr(made, name)[n:], np.concatenate([getattr(table, name)] * 2)), name
    assert not made.held_out_candidates[n:].any()
    copy = made.is_copy
    for k in range(5):
        for selection in ("inner", "last"):
            train, select, held = training.fold_clips(made, k, tiny(selection=selection))
            assert np.array_equal(held[:n], table.validation(k)) and not (held | select)[copy].any()
            kept_out = {made.files[i] for i in np.flatnonzero(held | select)}
            trained_copies = {made.files[i] for i in np.flatnonzero(train & copy)}
            assert not trained_copies & kept_out, (k, selection)
            # every other copy trains: two for each training source
            assert (train & copy).sum() == 2 * (train & ~copy).sum()


def test_copies_never_train_where_their_source_is_held_out_whatever_their_fold():
    """A table given with copies (say, by a pipeline stage) whose folds were drawn again."""
    table = folded()
    made = copies.add(table, [PITCH])
    made.fold = assign_folds(made, 5, 0)
    assert (made.fold[len(table):] == -1).all()
    for k in range(5):
        held_files = {made.files[i] for i in np.flatnonzero(made.validation(k))}
        assert held_files and not {made.files[i] for i in np.flatnonzero(made.training(k))} & held_files


def test_a_table_with_copies_saves_its_variants_and_one_without_as_before(tmp_path):
    table = folded().select(np.arange(6))
    table.save(tmp_path / "plain.csv")
    assert list(pd.read_csv(tmp_path / "plain.csv").columns) == COLUMNS
    made = copies.add(table, [Variant(-1.5, 1.1)])
    made.save(tmp_path / "copies.csv")
    back = ClipTable.load(tmp_path / "copies.csv", table.classes, False)
    assert back.variant == made.variant and back.origin.tolist() == made.origin.tolist()
    assert copies.transforms(back) == [None] * 6 + [Variant(-1.5, 1.1)] * 6 and copies.transforms(table) is None


# ------------------------------------------------------------------ training


class StopInEpoch(loop.Hook):
    """Ctrl-C during epoch `n` of the first fold, and the training set's steps an epoch."""

    def __init__(self, n: int | None = None):
        self.n, self.steps = n, 0

    def start(self, state) -> None:
        self.steps = state.steps

    def batch_end(self, state, x, logits, loss) -> None:
        if state.epoch + 1 == self.n:
            raise KeyboardInterrupt


def test_a_tiny_training_with_copies_trains_on_them_and_resumes_as_if_never_stopped(tmp_path, monkeypatch):
    data = datasets.read(demo_set(tmp_path / "data"))
    cfg = tiny(copies=[{"pitch": 2}])
    warm_copies(data.files, cfg)
    stop = StopInEpoch(2)
    with pytest.raises(KeyboardInterrupt):
        training.train(data, cfg, tmp_path / "run", progress=False, hooks=[stop])
    run = Run.open(tmp_path / "run")
    table = run.read_clips()
    copy = table.is_copy
    assert len(table) == 64 and copy.sum() == 32 and set(np.array(table.variant)[copy]) == {"pitch=2"}
    sources = table.select(~copy)
    assert np.array_equal(sources.fold, assign_folds(sources, 5, cfg.seed))  # the folds drawn without copies
    assert np.array_equal(table.fold[copy], sources.fold) and table.files[32:] == sources.files
    train, select, held = training.fold_clips(table, 0, cfg)
    assert train[copy].sum() == train[~copy].sum() > 0 and stop.steps == -(-train.sum() // 8)

    monkeypatch.setattr(store, "compute_all", pytest.fail)  # the copies' features are found by the saved rows
    asked = []
    monkeypatch.setattr(training, "extract", lambda *a, **kw: asked.append(kw["variants"]) or store.extract(*a, **kw))
    training.resume(tmp_path / "run", progress=False)
    assert asked == [[None] * 32 + [Variant(pitch=2)] * 32] and list(run.history(0).epoch) == [1, 2]
    whole = training.train(data, cfg, tmp_path / "whole", progress=False)
    resumed, uninterrupted = (load_file(str(r.folder / "fold0" / "model.safetensors")) for r in (run, whole))
    assert all(torch.equal(resumed[name], uninterrupted[name]) for name in uninterrupted)
    assert run.summary()["oof_clips"] == held.sum() == (table.fold[~copy] == 0).sum()  # held-out sources only
    assert run.read_oof()[0].fname.tolist() == [table.names[i] for i in np.flatnonzero(held)]


def test_a_broken_clip_has_no_copies_and_a_copy_that_cannot_be_made_is_skipped(tmp_path, monkeypatch):
    root = demo_set(tmp_path / "data", per_class=5)
    (root / "audio_train" / "broken.ogg").write_text("not audio")
    with open(root / "train.csv", "a") as f:
        f.write("broken.ogg,Cello,1\n")
    data = datasets.read(root)
    cfg = tiny(copies=[{"stretch": 1.1}], epochs=1, selection="last")
    readable = [f for f in map(str, data.files) if not f.endswith("broken.ogg")]
    lengths = {f: len(audio.load(f, cfg.features.sample_rate)) for f in readable}
    shortest = min(lengths.values())
    refused = next(f for f, n in lengths.items() if n == shortest)
    assert list(lengths.values()).count(shortest) == 1
    remake = Variant.apply

    def refuse_short(self, wave, sample_rate):  # a stretch that refuses the shortest clip
        if self == Variant(stretch=1.1) and len(wave) <= shortest:
            raise ValueError("too short to stretch")
        return remake(self, wave, sample_rate)

    monkeypatch.setattr(Variant, "apply", refuse_short)
    warm_copies(readable, cfg)
    run = training.train(data, cfg, tmp_path / "run", progress=False)
    table = run.read_clips()
    assert str(root / "audio_train" / "broken.ogg") not in table.files
    assert len(table) == 20 * 2 - 1 and (refused, "stretch=1.1") not in set(zip(table.files, table.variant))
    skipped = pd.read_csv(run.folder / "skipped.csv")
    assert sorted(skipped.file) == sorted([str(root / "audio_train" / "broken.ogg"), f"{refused} [stretch=1.1]"])
    assert "too short to stretch" in skipped.reason[skipped.file.str.endswith("[stretch=1.1]")].item()
    assert run.trained_folds() == [0]

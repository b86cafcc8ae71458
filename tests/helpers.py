"""Helpers shared by the prediction-side tests (predict, outputs, export, timeline,
demo, evaluate): tiny runs trained on the bundled real-audio demo set, and small
audio utilities.

A tiny run trains in a few seconds on 2 CPU cores. `shared_run` trains each
kind once per test session (the first test file that asks for it pays) into a
temporary folder; callers must treat it as read-only and `copy_run` it before
changing anything in it.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from soundtag import audio, config, datasets, features, loop, store, train
from soundtag.config import merge
from soundtag.features import FeatureConfig
from soundtag.run import Run

DEMO = Path(__file__).parents[1] / "data" / "demo"
MULTI = DEMO / "multilabel"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"

# An eighth-width Cnn6, no augmentation and a high learning
# rate, so that 3 epochs over the ~220 training clips of fold 0 learn something.
# One torch thread: on a busy 2-core machine two spinning threads per process make
# these small networks a hundred times slower. The default front end (hop 512,
# 86 frames a second), which hand-computed views and timelines expect.
TINY = {"epochs": 3, "batch_size": 16, "augment": [], "optim": {"lr": 0.01}, "threads": 1,
        "model": {"name": "cnn6", "params": {"width": 0.125}}, "features": {"n_fft": 1024, "hop_length": 512}}
# A stage of a recipe (pipeline, pseudo-labels, label spreading): one epoch of 32 clips in float32
# (bfloat16 autocast is many times slower on these CPUs), fold 0 of two, the fast preset's front end.
RECIPE_TINY = {"epochs": 1, "epoch_clips": 32, "batch_size": 16, "augment": [], "optim": {"lr": 0.01}, "threads": 1,
               "bf16": False, "selection": "inner", "model": {"name": "cnn6", "params": {"width": 0.125}}, "folds": 2,
               "train_folds": [0]}

KINDS: dict[str, tuple[Path, dict]] = {
    # single-label, FSDKaggle2018 layout
    "cnn6": (DEMO, {}),
    # the same classes, another seed and another network: an ensemble partner
    "mobilenet": (DEMO, {"seed": 1, "epochs": 1, "model": {"name": "mobilenetv2", "params": {"width": 0.25}}}),
    # multi-label, FSDKaggle2019 layout
    "multilabel": (MULTI, {"folds": 4}),  # 4 classes have only 4 curated clips
}

_SHARED: dict[str, Path] = {}


@contextmanager
def one_torch_thread() -> Iterator[None]:
    """Run torch on one thread (see TINY), restoring the setting afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def warm_cache(files, features_config: FeatureConfig, dtype: str = "float16") -> None:
    """Compute features in this process (a worker pool costs seconds of start-up
    per test); later `extract` calls over the same file list find them cached."""
    store.extract(list(files), features_config, workers=1, dtype=dtype, progress=False)


def train_tiny(out: Path, data: Path = DEMO, **overrides) -> Run:
    """Train a tiny run on `data`'s training split into `out`."""
    dataset = datasets.read(data)
    cfg = config.resolve("fast", overrides=merge(TINY, overrides))
    part = dataset.subset("train")
    warm_cache(part.files if cfg.noisy == "include" else part.select(~part.noisy).files, cfg.features)
    return train.train(dataset, cfg, out, progress=False)


def shared_run(factory: pytest.TempPathFactory, kind: str) -> Path:
    """The folder of a tiny run of `kind` (see KINDS), trained once per session. Read-only."""
    if kind not in _SHARED or not (_SHARED[kind] / "run.json").is_file():
        data, overrides = KINDS[kind]
        _SHARED[kind] = train_tiny(factory.mktemp(f"run-{kind}") / "run", data, **overrides).folder
    return _SHARED[kind]


def copy_run(run: Path, dest: Path) -> Path:
    """A private, modifiable copy of a run folder."""
    shutil.copytree(run, dest)
    return dest


def held_out(data: Path = DEMO) -> datasets.Dataset:
    """The labelled test clips of a demo dataset."""
    part = datasets.read(data).subset("test")
    return part.select(part.labelled)


def spec_of(path: Path | str, cfg: FeatureConfig) -> np.ndarray:
    """A clip's features exactly as the tagger computes them."""
    return features.compute(audio.load(path, cfg.sample_rate, cfg.trim_db), cfg)


def write_wav(path: Path, wave: np.ndarray, rate: int) -> Path:
    sf.write(str(path), np.asarray(wave, np.float32), rate, subtype="FLOAT")
    return path


def decode(path: Path | str, rate: int = 44100) -> np.ndarray:
    """A clip as mono float32 at `rate`, untrimmed."""
    return audio.load(path, rate, trim_db=None)


def bad_files(folder: Path) -> dict[str, Path]:
    """A missing file, an empty file and a text file posing as audio."""
    folder.mkdir(parents=True, exist_ok=True)
    empty = folder / "empty.wav"
    empty.write_bytes(b"")
    text = folder / "notes.wav"
    text.write_text("this is not audio, just a text file\n" * 20)
    return {"missing": folder / "missing.wav", "empty": empty, "text": text}



def error_line(capsys: pytest.CaptureFixture) -> str:
    """The whole of stderr, checked to be one `error:` line without a traceback."""
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


def small_noisy_set(front_end: FeatureConfig) -> datasets.Dataset:
    """32 curated and 24 noisy training clips of the multi-label demo set, their features cached."""
    full = datasets.read(MULTI)
    train = full.split == "train"
    keep = train & np.where(full.noisy, np.cumsum(full.noisy) <= 24, np.cumsum(train & ~full.noisy) <= 32)
    dataset = full.select(keep)
    warm_cache(dataset.files, front_end)
    return dataset


class InterruptInEpoch(loop.Hook):
    """Ctrl-C after the first training step of the n-th epoch a call trains
    (counted over all folds): the model has moved past its last checkpoint."""

    def __init__(self, n: int):
        self.n, self.finished = n, 0

    def batch_end(self, state, x, logits, loss) -> None:
        if self.finished + 1 == self.n:
            raise KeyboardInterrupt

    def epoch_end(self, state, record) -> None:
        self.finished += 1

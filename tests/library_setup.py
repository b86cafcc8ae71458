"""Shared set-up of the library, service and Ray tests: an exported copy of the
tiny cnn6 run and a folder of real demo clips (plus a long recording)."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from helpers import DEMO, copy_run, shared_run

# demo training clips of several classes and lengths
CLIPS = ("d000000.ogg", "d000004.ogg", "d000013.ogg", "d000029.ogg", "d000091.ogg", "d000108.ogg",
         "d000140.ogg", "d000067.ogg", "d000087.ogg", "d000026.ogg")
TEST_CLIP = DEMO / "audio_test" / "dt000002.ogg"


def exported_run(factory: pytest.TempPathFactory) -> Path:
    """A private copy of the tiny cnn6 run with its ONNX export."""
    from soundtag.export import export
    run = copy_run(shared_run(factory, "cnn6"), factory.mktemp("served") / "run")
    export(run)
    return run


def demo_folder(folder: Path, names: tuple[str, ...] = CLIPS) -> Path:
    """`folder` holding copies of demo clips, some in a subfolder."""
    (folder / "more").mkdir(parents=True)
    for i, name in enumerate(names):
        shutil.copy(DEMO / "audio_train" / name, folder / ("more" if i % 3 == 0 else "") / name)
    return folder


def long_recording(path: Path, seconds: float = 8.0) -> Path:
    """Demo clips joined into one recording of `seconds` (44.1 kHz WAV)."""
    parts, total = [], 0
    for name in CLIPS * 4:
        wave, rate = sf.read(DEMO / "audio_train" / name, dtype="float32")
        parts.append(wave if wave.ndim == 1 else wave.mean(1))
        total += len(parts[-1])
        if total >= seconds * rate:
            break
    sf.write(path, np.concatenate(parts)[: int(seconds * rate)], rate, subtype="PCM_16")
    return path

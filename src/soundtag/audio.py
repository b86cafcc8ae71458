"""Audio decoding: any supported file to mono float32 at a target rate.

The only module that opens audio files. Every failure is an `AudioError` that
names the file and says what is wrong with it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import soundfile as sf
import soxr

from .errors import SoundtagError

# libsndfile's note on a data chunk shorter than its header says
TRUNCATED = re.compile(r"^data\s*:\s*(\d+) \(should be (\d+)\)", re.M)


class AudioError(SoundtagError):
    """A clip that cannot be used, with its path and the reason."""

    def __init__(self, path: str | Path, reason: str):
        super().__init__(f"{path}: {reason}")
        self.path = str(path)
        self.reason = reason


@dataclass(frozen=True)
class AudioInfo:
    """What the file header says about a clip."""

    duration: float
    sample_rate: int
    channels: int
    format: str
    subtype: str


def info(path: str | Path) -> AudioInfo:
    """Read a clip's header without decoding it."""
    try:
        i = sf.info(str(path))
    except (sf.LibsndfileError, RuntimeError, OSError) as e:
        raise AudioError(path, _reason(path, e)) from None
    return AudioInfo(i.duration, i.samplerate, i.channels, i.format, i.subtype)


def load(path: str | Path, sample_rate: int = 44100, trim_db: float | None = 60.0) -> np.ndarray:
    """Decode `path` to mono float32 at `sample_rate`, trimming leading and
    trailing silence quieter than `trim_db` below the peak (None keeps it)."""
    try:
        with sf.SoundFile(str(path)) as f:
            data, rate, extra = _read(f), f.samplerate, f.extra_info
    except (sf.LibsndfileError, RuntimeError, OSError) as e:
        raise AudioError(path, _reason(path, e)) from None
    cut = TRUNCATED.search(extra)
    if cut:
        raise AudioError(path, f"truncated: the header promises {cut[1]} bytes of audio, the file holds {cut[2]}")
    if data.size == 0:
        raise AudioError(path, "no audio samples (empty or truncated file)")
    if not np.isfinite(data).all():
        raise AudioError(path, "contains NaN or infinite samples")
    wave = data.mean(axis=1) if data.shape[1] > 1 else data[:, 0]
    if rate != sample_rate:
        wave = soxr.resample(wave, rate, sample_rate, quality="HQ").astype(np.float32, copy=False)
    if trim_db is not None:
        wave = trim(wave, trim_db)
    return np.ascontiguousarray(wave, dtype=np.float32)


def trim(wave: np.ndarray, top_db: float = 60.0, frame: int = 2048, hop: int = 512) -> np.ndarray:
    """Cut leading and trailing audio whose centred-frame power is `top_db`
    below the loudest frame: the rule of `librosa.effects.trim`, in plain numpy
    (librosa's version costs seconds of JIT start-up per process). A silent
    clip is kept whole."""
    padded = np.pad(wave, frame // 2)
    n = 1 + (len(padded) - frame) // hop
    if n < 1:
        return wave
    if frame % hop:
        frames = np.lib.stride_tricks.sliding_window_view(padded, frame)[::hop][:n]
        power = np.einsum("ij,ij->i", frames, frames, dtype=np.float64) / frame
    else:  # each frame is frame/hop whole hops: sum the hops' energies once
        hops = padded[: (n - 1) * hop + frame].reshape(-1, hop)
        energy = np.einsum("ij,ij->i", hops, hops, dtype=np.float64)
        power = np.lib.stride_tricks.sliding_window_view(energy, frame // hop).sum(axis=1) / frame
    floor = max(power.max(), 1e-10) * 10.0 ** (-top_db / 10.0)
    loud = np.flatnonzero(np.maximum(power, 1e-10) > floor)
    if len(loud) == 0:
        return wave
    return wave[loud[0] * hop : min(len(wave), (loud[-1] + 1) * hop)]


def _read(f: sf.SoundFile) -> np.ndarray:
    """All frames as float32 [frames, channels]; 16-bit PCM is scaled in numpy,
    which gives the same values as libsndfile's conversion in half the time."""
    if f.subtype != "PCM_16":
        return f.read(dtype="float32", always_2d=True)
    return np.multiply(f.read(dtype="int16", always_2d=True), np.float32(1 / 32768), dtype=np.float32)


def _reason(path: str | Path, error: Exception) -> str:
    p = Path(path)
    if not p.exists():
        return "file not found"
    if p.is_dir():
        return "is a directory, not an audio file"
    if p.stat().st_size == 0:
        return "empty file (0 bytes)"
    text = str(error).split(":")[-1].strip() or type(error).__name__
    return f"not readable as audio ({text})"

"""The log-mel / MFCC front end, computed in torch one clip at a time.

`torch.stft` on a single clip plus a mel matrix was measured as the fastest CPU
path (batching clips of different lengths into one STFT was slower). The mel
filters are librosa's, so the output equals `librosa.feature.melspectrogram`
followed by `librosa.power_to_db` for the same parameters.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass, fields
from functools import lru_cache

import librosa
import numpy as np
import scipy.fft
import scipy.signal
import torch

from .errors import ConfigError

KINDS = ("logmel", "mfcc", "waveform")  # waveform: the samples as one feature row, a frame a sample
AMIN = 1e-10
MAX_FRAMES, MAX_WAVEFORM_SECONDS = 4096, 48
# beyond these, one clip's spectrogram or the mel filters take gigabytes
LIMITS = {"sample_rate": 768_000, "n_fft": 65_536, "hop_length": 65_536, "n_mels": 1024}


@dataclass(frozen=True)
class FeatureConfig:
    """Everything that determines a clip's features; its hash keys the cache."""

    sample_rate: int = 44100
    n_fft: int = 1024
    hop_length: int = 512
    win_length: int | None = None
    window: str = "hann"
    n_mels: int = 64
    fmin: float = 20.0
    fmax: float | None = None
    top_db: float | None = 80.0
    kind: str = "logmel"
    n_mfcc: int = 40
    trim_db: float | None = 60.0

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ConfigError(f"unknown feature kind {self.kind!r}; valid kinds: {', '.join(KINDS)}")
        for name, largest in LIMITS.items():
            value = getattr(self, name)
            if value <= 0:
                raise ConfigError(f"{name} must be positive, not {value}")
            if value > largest:
                raise ConfigError(f"{name} must be at most {largest}, not {value}")
        if self.win_length is not None and not 0 < self.win_length <= self.n_fft:
            raise ConfigError(f"win_length must be between 1 and n_fft ({self.n_fft}), not {self.win_length}")
        nyquist = self.sample_rate / 2
        if not 0 <= self.fmin < (self.fmax or nyquist) <= nyquist:
            raise ConfigError(f"need 0 ≤ fmin < fmax ≤ sample_rate/2 ({nyquist:g}); got fmin {self.fmin}, "
                              f"fmax {self.fmax}")
        if self.top_db is not None and not 0 < self.top_db < math.inf:
            raise ConfigError(f"top_db must be a positive number of dB (or None), not {self.top_db}")
        if self.trim_db is not None and not 0 < self.trim_db < math.inf:
            raise ConfigError(f"trim_db (--trim-db) must be a positive number of dB below the peak, not "
                              f"{self.trim_db} (None, or --no-trim, keeps the silence)")
        if self.kind == "waveform" and self.hop_length != 1:
            raise ConfigError(f"features of kind waveform are one frame a sample: set hop_length to 1 "
                              f"(--hop-length 1), not {self.hop_length}")
        if self.kind == "mfcc" and not 0 < self.n_mfcc <= self.n_mels:
            raise ConfigError(f"n_mfcc must be between 1 and n_mels ({self.n_mels})")
        try:
            scipy.signal.get_window(self.window, 8)
        except ValueError:
            raise ConfigError(f"unknown window {self.window!r} (any scipy.signal.get_window name)") from None

    @property
    def n_features(self) -> int:
        """Rows of the feature matrix: mel bands, MFCCs, or 1 (the waveform)."""
        return {"mfcc": self.n_mfcc, "waveform": 1}.get(self.kind, self.n_mels)

    @property
    def max_frames(self) -> int:
        """The most frames of a clip scored whole (longer ones are centre-cropped):
        4096, or 48 s of waveform."""
        return MAX_WAVEFORM_SECONDS * self.sample_rate if self.kind == "waveform" else MAX_FRAMES

    def frames(self, n_samples: int) -> int:
        """Frames computed from `n_samples` (centred STFT; the samples themselves for the waveform)."""
        return n_samples if self.kind == "waveform" else 1 + n_samples // self.hop_length

    def seconds(self, frames: int) -> float:
        return frames * self.hop_length / self.sample_rate

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> FeatureConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"unknown feature option(s) {', '.join(unknown)}; valid: {', '.join(sorted(known))}")
        return cls(**data)

    def key(self) -> str:
        """A short stable hash of the configuration."""
        text = json.dumps(self.to_dict(), sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:16]


class FrontEnd(torch.nn.Module):
    """Waveform [samples] → features [n_features, frames] (dB or MFCC)."""

    def __init__(self, config: FeatureConfig):
        super().__init__()
        self.config = config
        c = config
        win = scipy.signal.get_window(c.window, c.win_length or c.n_fft, fftbins=True)
        mel = librosa.filters.mel(sr=c.sample_rate, n_fft=c.n_fft, n_mels=c.n_mels, fmin=c.fmin, fmax=c.fmax)
        self.register_buffer("window", torch.from_numpy(win.astype(np.float32)))
        self.register_buffer("mel", torch.from_numpy(mel.astype(np.float32)))
        if c.kind == "mfcc":
            dct = scipy.fft.dct(np.eye(c.n_mels), type=2, norm="ortho", axis=0)[: c.n_mfcc]
            self.register_buffer("dct", torch.from_numpy(dct.astype(np.float32)))

    def forward(self, wave: torch.Tensor) -> torch.Tensor:
        c = self.config
        spec = torch.stft(wave, c.n_fft, c.hop_length, c.win_length or c.n_fft, self.window,
                          center=True, pad_mode="constant", return_complex=True)
        power = spec.real.square() + spec.imag.square()
        db = 10.0 * torch.log10(torch.clamp(self.mel @ power, min=AMIN))
        if c.top_db is not None:
            db = torch.maximum(db, db.max() - c.top_db)
        return self.dct @ db if c.kind == "mfcc" else db


@lru_cache(maxsize=8)
def front_end(config: FeatureConfig) -> FrontEnd:
    """The (shared, stateless) front end for a configuration."""
    return FrontEnd(config).eval()


def compute(wave: np.ndarray, config: FeatureConfig) -> np.ndarray:
    """Features [n_features, frames] (float32) of a mono waveform."""
    if config.kind == "waveform":
        return np.asarray(wave, np.float32)[None]
    with torch.inference_mode():
        return front_end(config)(torch.from_numpy(np.ascontiguousarray(wave, np.float32))).numpy()

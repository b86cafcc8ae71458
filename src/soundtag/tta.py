"""Test-time augmentation: the views of a clip that a network scores — the
whole clip, crops of several lengths at evenly spaced offsets, or sliding
tiles. Lengths are in seconds."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from .errors import ConfigError
from .registry import Registry

MEANS = ("arithmetic", "geometric")
MAX_SECONDS = 600.0  # no view is longer than this
MAX_VIEW_SECONDS = 600  # test-time crops of one clip, all lengths and offsets together
MAX_TILE_OVERLAP = 20  # tiles covering any moment of a clip


MODES: Registry[Callable[[TTA, np.ndarray, float], list[np.ndarray]]] = Registry("TTA mode")


@MODES.register("full")
def full_view(tta: TTA, spec: np.ndarray, fps: float) -> list[np.ndarray]:
    return [spec[None, None].astype(np.float32)]


@MODES.register("tiles")
def tile_views(tta: TTA, spec: np.ndarray, fps: float) -> list[np.ndarray]:
    size = view_frames(tta.tile, fps)
    starts = tile_starts(spec.shape[1], size, max(1, round(tta.hop * fps)))
    return [np.stack([window(spec, s, size) for s in starts])[:, None]]


@MODES.register("crops")
def crop_views(tta: TTA, spec: np.ndarray, fps: float) -> list[np.ndarray]:
    out = []
    for seconds in tta.lengths:
        size = view_frames(seconds, fps)
        starts = np.linspace(0, max(0, spec.shape[1] - size), tta.offsets).round().astype(int)
        out.append(np.stack([window(spec, s, size) for s in np.unique(starts)])[:, None])
    return out


@dataclass(frozen=True)
class TTA:
    """Which views of a clip are scored, and the mean that combines their scores."""

    mode: str = "full"
    lengths: tuple[float, ...] = (1.0, 1.5, 2.0, 3.0, 4.0, 5.0)
    offsets: int = 5
    tile: float = 2.0
    hop: float = 1.0
    mean: str = "arithmetic"

    def __post_init__(self) -> None:
        object.__setattr__(self, "lengths", tuple(self.lengths))  # a config's list
        MODES.get(self.mode)
        if self.mean not in MEANS:
            raise ConfigError(f"unknown mean {self.mean!r}; valid: {', '.join(MEANS)}")
        seconds = [*self.lengths, self.tile, self.hop]
        if not self.lengths or not all(np.isfinite(s) and 0 < s <= MAX_SECONDS for s in seconds):
            raise ConfigError(f"TTA crop lengths, tile and hop must be between 0 and {MAX_SECONDS:g} s")
        if not 1 <= self.offsets <= 100:
            raise ConfigError("TTA offsets must be between 1 and 100")
        crops = self.offsets * sum(self.lengths)
        if self.mode == "crops" and crops > MAX_VIEW_SECONDS:
            raise ConfigError(f"TTA offsets × the sum of its crop lengths is {crops:g} s of crops a clip; keep it "
                              f"at most {MAX_VIEW_SECONDS} s")
        if self.mode == "tiles" and self.tile > MAX_TILE_OVERLAP * self.hop:
            raise ConfigError(f"a TTA tile of {self.tile:g} s every {self.hop:g} s scores each moment "
                              f"{self.tile / self.hop:.0f} times; keep its hop at least tile / {MAX_TILE_OVERLAP}")

    def views(self, spec: np.ndarray, fps: float) -> list[np.ndarray]:
        """Batches [n, 1, F, T] of the views of one clip, one batch per view length."""
        return MODES.get(self.mode)(self, spec, fps)


def view_frames(seconds: float, fps: float) -> int:
    """Frames of a view of `seconds`: at least 8."""
    return max(8, round(seconds * fps))


def tile_starts(frames: int, size: int, hop: int) -> list[int]:
    """Tile starts covering the clip, the last tile flush with its end."""
    if frames <= size:
        return [0]
    starts = list(range(0, frames - size + 1, hop))
    return starts if starts[-1] == frames - size else starts + [frames - size]


def window(spec: np.ndarray, start: int, size: int) -> np.ndarray:
    """`size` frames from `start`, wrapping a clip shorter than that."""
    idx = (start + np.arange(size)) % spec.shape[1]
    return spec[:, idx].astype(np.float32)

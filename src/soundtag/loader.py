"""Batches from the feature cache: variable-length training crops and
length-sorted evaluation batches."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import torch

from .augment import crop_length, crop_or_pad
from .config import CropConfig
from .store import FeatureStore


@dataclass
class ClipSet:
    """Some clips of a feature store with their targets and loss weights."""

    store: FeatureStore
    rows: np.ndarray
    targets: np.ndarray
    weights: np.ndarray

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def lengths(self) -> np.ndarray:
        return self.store.frames[self.rows]

    def spec(self, i: int) -> np.ndarray:
        return self.store[int(self.rows[i])]


def steps_per_epoch(n: int, batch_size: int, world: int = 1) -> int:
    return max(1, -(-n // batch_size) // world)


def epoch_size(clips: ClipSet, limit: int | None) -> int:
    """Clips an epoch draws: all, or at most `limit`."""
    return min(len(clips), limit or len(clips))


def train_batches(clips: ClipSet, batch_size: int, crop: CropConfig, rng: np.random.Generator,
                  rank: int = 0, world: int = 1,
                  limit: int | None = None) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """One epoch of shuffled batches (x [B,1,F,T], y [B,C], weight [B]) over
    all clips or a fresh random draw of `limit` of them; every batch has its
    own crop length. With `world` processes, each takes its share of the same
    shuffled order."""
    order = rng.permutation(len(clips))[: epoch_size(clips, limit)]
    lengths = clips.lengths
    steps = steps_per_epoch(len(order), batch_size, world)
    for step in range(steps):
        length = crop_length(lengths, crop.low_pct, crop.high_pct, rng)
        start = (step * world + rank) * batch_size
        idx = order[np.arange(start, start + batch_size) % len(order)]
        x = np.stack([crop_or_pad(clips.spec(i), length, rng, crop.pad_mode) for i in idx])
        yield (torch.from_numpy(x).unsqueeze(1), torch.from_numpy(clips.targets[idx]),
               torch.from_numpy(clips.weights[idx]))


def eval_batches(spec: Callable[[int], np.ndarray], lengths: np.ndarray, batch_size: int,
                 slack: float = 1.1, max_frames: int = 4096) -> Iterator[tuple[np.ndarray, torch.Tensor]]:
    """(positions, x) over whole clips: clips sorted by length and batched while
    the longest is at most `slack` times the shortest, the shorter ones padded
    by wrapping; clips longer than `max_frames` are centre-cropped."""
    order = np.argsort(lengths, kind="stable")
    rng = np.random.default_rng(0)
    start = 0
    while start < len(order):
        end = start + 1
        while end < min(len(order), start + batch_size) and lengths[order[end]] <= slack * lengths[order[start]]:
            end += 1
        idx = order[start:end]
        length = int(min(lengths[idx].max(), max_frames))
        x = np.stack([crop_or_pad(spec(i), length, rng, "wrap", random_offset=False) for i in idx])
        yield idx, torch.from_numpy(x).unsqueeze(1)
        start = end

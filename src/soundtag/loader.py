"""Batches from the feature cache: variable-length training crops (shuffled,
or with a fixed share of every batch from each clip origin) and length-sorted
evaluation batches."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import torch

from .augment import crop_length, crop_or_pad
from .clips import ORIGINS
from .config import CropConfig
from .errors import DataError
from .store import FeatureStore

log = logging.getLogger("soundtag")


@dataclass
class ClipSet:
    """Some clips of a feature store with their targets and loss weights."""

    store: FeatureStore
    rows: np.ndarray
    targets: np.ndarray
    weights: np.ndarray
    origins: np.ndarray | None = None  # each clip's origin (clips.ORIGINS), for batch shares and origin losses

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
                  rank: int = 0, world: int = 1, limit: int | None = None, shares: dict[str, float] | None = None
                  ) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor, np.ndarray]]:
    """One epoch of shuffled batches (x [B,1,F,T], y [B,C], weight [B], the
    clips' positions in `clips` [B]) over all clips or a fresh random draw of
    `limit` of them; every batch has its own crop length. With `shares`
    (origin → share), every batch takes `share_counts` clips of each origin,
    each origin's clips in their own shuffled order, wrapping around when used
    up (the epoch has as many batches as without). With `world` processes,
    each takes its share of the same shuffled orders."""
    steps = steps_per_epoch(epoch_size(clips, limit), batch_size, world)
    if shares:
        counts = share_counts(shares, batch_size)
        groups = [(rng.permutation(np.flatnonzero(clips.origins == o)), n) for o, n in counts.items()]
    else:
        groups = [(rng.permutation(len(clips))[: epoch_size(clips, limit)], batch_size)]
    lengths = clips.lengths
    for step in range(steps):
        length = crop_length(lengths, crop.low_pct, crop.high_pct, rng)
        idx = np.concatenate([order[(np.arange(n) + (step * world + rank) * n) % len(order)] for order, n in groups])
        x = np.stack([crop_or_pad(clips.spec(i), length, rng, crop.pad_mode) for i in idx])
        yield (torch.from_numpy(x).unsqueeze(1), torch.from_numpy(clips.targets[idx]),
               torch.from_numpy(clips.weights[idx]), idx)


def share_counts(shares: dict[str, float], batch_size: int) -> dict[str, int]:
    """Clips a batch takes of each origin (in `ORIGINS` order): its share of
    `batch_size`, rounded to whole clips that add up to the batch (the largest
    remainders round up)."""
    names = [o for o in ORIGINS if o in shares]
    exact = np.array([shares[o] * batch_size for o in names])
    counts = np.floor(exact).astype(int)
    counts[np.argsort(counts - exact, kind="stable")[: batch_size - counts.sum()]] += 1
    return dict(zip(names, counts.tolist()))


def check_shares(origins: np.ndarray, shares: dict[str, float] | None, where: str) -> None:
    """Every origin `shares` asks for is among `origins` (a DataError naming
    `where` if not); a warning names the clips no share draws."""
    if not shares:
        return
    present, counts = np.unique(origins, return_counts=True)
    missing = [o for o in shares if o not in present]
    if missing:
        raise DataError(f"batch_shares asks for {', '.join(missing)} clips, but {where} has none; "
                        f"its training clips are {', '.join(present) or 'none'}")
    left = [f"{n} {o}" for o, n in zip(present, counts) if o not in shares]
    if left:
        log.warning(f"batch_shares names no share for {where}'s {', '.join(left)} clip(s): they are not trained on")


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

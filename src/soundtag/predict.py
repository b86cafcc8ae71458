"""Tagging audio files with a scorer (a run, a stack or an ensemble): the
Python face of `soundtag predict` and `soundtag tag`.

`Tagger.tag(path)` decodes a file once and returns its scores, embedding,
duration and, for long recordings, a timeline. `Tagger.tag_files` tags many
files: threads decode files and compute their features up to `CHUNK` clips
ahead of the networks, which score the clips already computed.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from . import audio, features
from .datasets import Dataset
from .features import FeatureConfig
from .scorer import Clip, Scorer, combine, load, ordered_map
from .store import clip_features, extract, one_torch_thread
from .timeline import Timeline, timeline_of
from .tta import TTA

CHUNK = 128  # clips scored together while tagging files

__all__ = ["CHUNK", "TTA", "TagResult", "Tagger", "combine", "ordered_map"]


@dataclass
class TagResult:
    """One file's tags: scores per class, the embedding, its duration (s) and,
    when it is long, the timeline of its windows."""

    file: str
    duration: float
    scores: np.ndarray
    embedding: np.ndarray
    classes: list[str]
    timeline: Timeline | None = None

    def top(self, k: int = 3) -> list[tuple[str, float]]:
        """The k best (label, score) pairs, best first."""
        return [(self.classes[j], float(self.scores[j])) for j in np.argsort(-self.scores)[:k]]


class Tagger:
    """Tags audio with a scorer; `threads` batches (and files' features) are computed at once."""

    def __init__(self, scorer: Scorer, threads: int = 0):
        self.scorer, self.threads = scorer, threads or len(os.sched_getaffinity(0))
        self.classes, self.multilabel = scorer.classes, scorer.multilabel

    @classmethod
    def load(cls, runs: Sequence[str | Path], weights: Sequence[float] | None = None, backend: str = "torch",
             tta: TTA | None = None, mean: str = "arithmetic", threads: int = 0) -> Tagger:
        """Run or stack folders, ensembled when there are several (optionally weighted)."""
        return cls(load(runs, weights, backend, tta, mean, threads), threads)

    @property
    def feature_configs(self) -> list[FeatureConfig]:
        return self.scorer.feature_configs

    def thresholds(self) -> np.ndarray:
        """Per-class thresholds tuned on the runs' out-of-fold scores."""
        return self.scorer.thresholds()

    def score(self, clips: Sequence[Clip], progress: bool = False,
              exact: bool = False) -> tuple[np.ndarray, np.ndarray]:
        """Scores and embeddings of clips' features (`exact`: see `Scorer.score`)."""
        with one_torch_thread():
            return self.scorer.score(clips, progress, exact)

    def score_clips(self, clips: Sequence[Clip], progress: bool = False) -> np.ndarray:
        return self.score(clips, progress)[0]

    def score_each(self, clips: Sequence[Clip]) -> tuple[np.ndarray, np.ndarray]:
        """Like `score`, but only clips of equal length share a batch, so that a
        clip's scores never depend on the others."""
        return self.score(clips, exact=True)

    def decode(self, path: str | Path, whole: bool = True) -> tuple[float, Clip, Clip]:
        """A file decoded once per sample rate: its duration, its features as
        trained (trimmed) and untrimmed (for timelines; empty unless `whole`)."""
        waves = {rate: audio.load(path, rate, None) for rate in {c.sample_rate for c in self.feature_configs}}
        trimmed, untrimmed = {}, {}
        for c in self.feature_configs:
            wave = waves[c.sample_rate]
            trimmed[c] = features.compute(audio.trim(wave, c.trim_db) if c.trim_db is not None else wave, c)
            if whole:
                untrimmed[c] = trimmed[c] if c.trim_db is None else features.compute(wave, c)
        first = self.feature_configs[0]
        return len(waves[first.sample_rate]) / first.sample_rate, trimmed, untrimmed

    def tag(self, path: str | Path, long: float = 30.0, window: float = 2.0, hop: float = 1.0) -> TagResult:
        """One file's tags; files longer than `long` seconds also get a timeline."""
        duration, trimmed, whole = self.decode(path)
        scores, embedding = self.score([trimmed])
        line = timeline_of(whole, self.score_clips, self.classes, window, hop) if duration > long else None
        return TagResult(str(path), duration, scores[0], embedding[0], self.classes, line)

    def timeline(self, path: str | Path, window: float = 2.0, hop: float = 1.0) -> Timeline:
        """Score every `window`-second stretch of a recording, `hop` seconds apart."""
        return timeline_of(self.decode(path)[2], self.score_clips, self.classes, window, hop)

    def score_files(self, files: Sequence[str | Path], workers: int | None = None,
                    progress: bool = True) -> tuple[np.ndarray, np.ndarray, dict[int, str]]:
        """Scores [files, classes] and embeddings (NaN rows for unreadable
        files) and {position: reason}."""
        files = [str(f) for f in files]
        configs = self.feature_configs
        scores = np.full((len(files), len(self.classes)), np.nan, np.float32)
        embeddings: np.ndarray | None = None
        errors: dict[int, str] = {}
        pending: list[tuple[int, Clip]] = []
        bar = tqdm(total=len(files), unit="file", desc="tagging", disable=not progress, dynamic_ncols=True)

        def score_pending() -> None:
            nonlocal embeddings
            if pending:
                rows = [i for i, _ in pending]
                s, e = self.score([clip for _, clip in pending])
                if embeddings is None:
                    embeddings = np.full((len(files), e.shape[1]), np.nan, np.float32)
                scores[rows], embeddings[rows] = s, e
                bar.update(len(pending))
                pending.clear()

        with bar, one_torch_thread():
            computed = ordered_map(lambda f: clip_features(f, configs), files, workers or self.threads, CHUNK)
            for i, (specs, error) in enumerate(computed):
                if specs is None:
                    errors[i] = error
                    bar.update()
                    continue
                pending.append((i, dict(zip(configs, specs))))
                if len(pending) == CHUNK:
                    score_pending()
            score_pending()
        return scores, embeddings if embeddings is not None else np.zeros((len(files), 0), np.float32), errors

    def tag_files(self, files: Sequence[str | Path], workers: int | None = None,
                  progress: bool = True) -> tuple[np.ndarray, dict[int, str]]:
        """Scores [files, classes] (NaN rows for unreadable files) and {position: reason}."""
        scores, _, errors = self.score_files(files, workers, progress)
        return scores, errors

    def tag_dataset(self, dataset: Dataset, cache_dir: str | Path | None = None,
                    progress: bool = True) -> tuple[np.ndarray, dict[int, str]]:
        """Like `tag_files`, with the features taken from (and kept in) the feature store."""
        stores = {c: extract(dataset.files, c, cache_dir, progress=progress) for c in self.feature_configs}
        errors = {i: reason for s in stores.values() for i, reason in s.errors.items()}
        ok = [i for i in range(len(dataset)) if i not in errors]
        scores = np.full((len(dataset), len(self.classes)), np.nan, np.float32)
        if ok:
            scores[ok] = self.score_clips([{c: s[i] for c, s in stores.items()} for i in ok], progress)
        return scores, errors

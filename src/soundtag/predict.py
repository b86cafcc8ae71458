"""Tagging audio files with a scorer (a run, a stack or an ensemble): the
Python face of `soundtag predict` and `soundtag tag`.

`Tagger.tag(path)` decodes a file once and returns its scores, embedding,
duration and, for long recordings, a timeline. `Tagger.tag_files` tags many
files, each at its own length: threads decode files and compute their features
up to `CHUNK` clips ahead of the networks, which score the clips already
computed. A large job is shared among worker processes forked from this one
(`soundtag.workers`; each inherits the loaded networks and tags its shares on
one thread): they run side by side, where threads of one process share its
Python interpreter and slow each other down.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from . import audio, features
from .datasets import Dataset
from .features import FeatureConfig
from .scorer import Clip, Scorer, combine, load, ordered_map, set_threads
from .store import clip_features, extract, one_torch_thread
from .timeline import Timeline, timeline_of
from .tta import TTA
from .workers import WorkerDied, Workers, processes_for, shares

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


class _Rows:
    """A job's scores and embeddings (NaN rows until scored) and its unreadable files."""

    def __init__(self, files: int, classes: int):
        self.scores = np.full((files, classes), np.nan, np.float32)
        self.embeddings: np.ndarray | None = None
        self.errors: dict[int, str] = {}

    def put(self, rows: list[int] | slice, scores: np.ndarray, embeddings: np.ndarray) -> None:
        self.scores[rows] = scores
        if embeddings.shape[1]:  # a share of unreadable files has none
            if self.embeddings is None:
                self.embeddings = np.full((len(self.scores), embeddings.shape[1]), np.nan, np.float32)
            self.embeddings[rows] = embeddings

    def result(self) -> tuple[np.ndarray, np.ndarray, dict[int, str]]:
        embeddings = self.embeddings if self.embeddings is not None else np.zeros((len(self.scores), 0), np.float32)
        return self.scores, embeddings, dict(sorted(self.errors.items()))  # in file order, however scored


class Tagger:
    """Tags audio with a scorer; `threads` batches (and files' features) are
    computed at once, and `tag_files` shares a job among up to `processes`
    worker processes (default: as many as threads; 1: none)."""

    def __init__(self, scorer: Scorer, threads: int = 0, processes: int = 0):
        self.scorer, self.threads = scorer, threads or len(os.sched_getaffinity(0))
        self.processes = processes or self.threads
        self.classes, self.multilabel = scorer.classes, scorer.multilabel
        self._pool: Workers | None = None
        self._pool_lock = threading.Lock()

    def __enter__(self) -> Tagger:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Stop the worker processes, if any were started (they also stop when this process ends)."""
        with self._pool_lock:
            pool, self._pool = self._pool, None
        if pool is not None:
            pool.close()

    def _workers(self, processes: int) -> Workers:
        """At least `processes` worker processes, forked at the first large job and
        kept for the next: a process tags its first share more slowly (its memory
        is still the parent's, copied page by page as it writes)."""
        with self._pool_lock:
            if self._pool is not None and self._pool.processes < processes:
                self._pool.close()
                self._pool = None
            if self._pool is None:
                self._pool = Workers(self, processes, lambda: set_threads(self.scorer, 1))
            return self._pool

    def _drop(self, pool: Workers) -> None:
        """Kill workers that failed a job, or were interrupted, and forget them."""
        with self._pool_lock:
            if self._pool is pool:
                self._pool = None
        pool.kill()

    @classmethod
    def load(cls, runs: Sequence[str | Path], weights: Sequence[float] | None = None, backend: str = "torch",
             tta: TTA | None = None, mean: str = "arithmetic", threads: int = 0, processes: int = 0) -> Tagger:
        """Run or stack folders, ensembled when there are several (optionally weighted)."""
        return cls(load(runs, weights, backend, tta, mean, threads), threads, processes)

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
        files) and {position: reason}. Each file is scored at its own length
        (only clips of equal length share a batch), so its scores do not depend
        on the others, nor on how the job is shared out. A job of at least
        `workers.PROCESS_FILES` files a process is shared among worker processes; a
        smaller one, or one given `workers` (threads computing features ahead of
        the networks), is tagged in this process."""
        files = [str(f) for f in files]
        processes = 1 if workers else processes_for(len(files), self.processes)
        with tqdm(total=len(files), unit="file", desc="tagging", disable=not progress, dynamic_ncols=True) as bar:
            if processes > 1:
                return self._score_in_processes(files, processes, bar)
            return self._score_here(files, workers or self.threads, bar)

    def _score_here(self, files: list[str], workers: int = 0,
                    bar: tqdm | None = None) -> tuple[np.ndarray, np.ndarray, dict[int, str]]:
        """`score_files` in this process: `workers` threads compute features ahead
        of the networks (0: this thread, in turn with them)."""
        configs = self.feature_configs
        rows = _Rows(len(files), len(self.classes))
        pending: list[tuple[int, Clip]] = []

        def score_pending() -> None:
            if pending:
                rows.put([i for i, _ in pending], *self.score_each([clip for _, clip in pending]))
                if bar is not None:
                    bar.update(len(pending))
                pending.clear()

        with one_torch_thread():
            computed = ordered_map(lambda f: clip_features(f, configs), files, workers, CHUNK if workers else 0)
            for i, (specs, error) in enumerate(computed):
                if specs is None:
                    rows.errors[i] = error
                    if bar is not None:
                        bar.update()
                    continue
                pending.append((i, dict(zip(configs, specs))))
                if len(pending) == CHUNK:
                    score_pending()
            score_pending()
        return rows.result()

    def _score_in_processes(self, files: list[str], processes: int,
                            bar: tqdm) -> tuple[np.ndarray, np.ndarray, dict[int, str]]:
        """`score_files` with the files cut into shares, tagged by worker processes
        forked from this one (so they start at once, the networks already loaded);
        a share not started yet is dropped when the job fails or is interrupted."""
        parts = shares(files, processes, CHUNK)
        rows = _Rows(len(files), len(self.classes))
        pool = self._workers(processes)
        try:
            for i, (scores, embeddings, errors) in pool.run("_score_here", [part for _, part in parts]):
                start = parts[i][0]
                rows.put(slice(start, start + len(scores)), scores, embeddings)
                rows.errors.update({start + j: reason for j, reason in errors.items()})
                bar.update(len(scores))
        except WorkerDied as e:
            self._drop(pool)
            raise WorkerDied(f"{e} while tagging {len(files)} files; with one process (`--processes 1`) it may "
                             "run in less memory") from None
        except BaseException:
            self._drop(pool)
            raise
        return rows.result()

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

"""Tagging long recordings: scores per window, events, and a plot."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from .errors import ConfigError
from .features import FeatureConfig
from .plots import figure, save
from .tta import tile_starts


@dataclass
class Timeline:
    starts: np.ndarray
    window: float
    scores: np.ndarray
    classes: list[str]

    def table(self) -> pd.DataFrame:
        """One row a window: start, end and a score per class."""
        frame = pd.DataFrame(self.scores, columns=self.classes)
        frame.insert(0, "end", self.starts + self.window)
        frame.insert(0, "start", self.starts)
        return frame

    def events(self, thresholds: np.ndarray | float = 0.5) -> pd.DataFrame:
        """Runs of consecutive windows whose score reaches the class threshold,
        merged into (start, end, label, score = the run's highest score)."""
        hits = self.scores >= np.broadcast_to(thresholds, (len(self.classes),))
        rows = []
        for j, label in enumerate(self.classes):
            edges = np.diff(np.concatenate([[0], hits[:, j].astype(np.int8), [0]]))
            for a, b in zip(np.flatnonzero(edges == 1), np.flatnonzero(edges == -1)):
                rows.append((self.starts[a], self.starts[b - 1] + self.window, label,
                             float(self.scores[a:b, j].max())))
        return pd.DataFrame(rows, columns=["start", "end", "label", "score"]).sort_values(["start", "label"])

    def plot(self, path: str | Path, top: int = 10) -> Path:
        """Scores over time of the `top` classes with the highest peaks."""
        best = np.argsort(-self.scores.max(0))[:top]
        fig, ax = figure(10, 0.35 * len(best) + 1.5)
        end = self.starts[-1] + self.window
        ax.imshow(self.scores[:, best].T, aspect="auto", cmap="magma", vmin=0, vmax=1,
                  extent=(0, end, len(best) - 0.5, -0.5), interpolation="nearest")
        ax.set_yticks(range(len(best)), [self.classes[j] for j in best], fontsize=8)
        ax.set(xlabel="time (s)", title="Tag scores over time")
        return save(fig, Path(path))


def check_window(window: float, hop: float) -> None:
    if not (np.isfinite(window) and np.isfinite(hop) and window > 0 and hop > 0):
        raise ConfigError(f"timeline window and hop must be positive seconds, not {window} and {hop}")


def windows(specs: dict[FeatureConfig, np.ndarray], window: float = 2.0,
            hop: float = 1.0) -> tuple[np.ndarray, float, list[dict[FeatureConfig, np.ndarray]]]:
    """Every `window`-second stretch of a recording's (untrimmed) features,
    `hop` seconds apart, the last window flush with the end: (starts in
    seconds, window length, the windows as clips). Times are those of whole
    frames of the first front end."""
    check_window(window, hop)
    per_config, starts, length = {}, None, window
    for config, spec in specs.items():
        fps = config.sample_rate / config.hop_length
        size = max(8, round(window * fps))
        first = tile_starts(spec.shape[1], size, max(1, round(hop * fps)))
        per_config[config] = [spec[:, s : s + size] for s in first]
        if starts is None:
            starts, length = np.asarray(first) / fps, size / fps
    n = min(len(v) for v in per_config.values())
    return starts[:n], length, [{c: v[i] for c, v in per_config.items()} for i in range(n)]


def timeline_of(specs: dict[FeatureConfig, np.ndarray], score: Callable[[Sequence[dict]], np.ndarray],
                classes: list[str], window: float = 2.0, hop: float = 1.0) -> Timeline:
    """The timeline of a recording's features, each window scored by `score`."""
    starts, length, clips = windows(specs, window, hop)
    return Timeline(starts, length, score(clips), classes)


def timeline(tagger, path: str | Path, window: float = 2.0, hop: float = 1.0) -> Timeline:
    """Score every `window`-second stretch of a recording (see `Tagger.timeline`)."""
    return tagger.timeline(path, window, hop)

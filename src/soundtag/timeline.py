"""Tagging long recordings: scores per window, events, and a plot."""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from .audio import AudioError  # noqa: E402
from .errors import ConfigError  # noqa: E402
from .plots import save  # noqa: E402
from .predict import Tagger, tile_starts  # noqa: E402
from .store import clip_features  # noqa: E402


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
        fig, ax = plt.subplots(figsize=(10, 0.35 * len(best) + 1.5))
        end = self.starts[-1] + self.window
        ax.imshow(self.scores[:, best].T, aspect="auto", cmap="magma", vmin=0, vmax=1,
                  extent=(0, end, len(best) - 0.5, -0.5), interpolation="nearest")
        ax.set_yticks(range(len(best)), [self.classes[j] for j in best], fontsize=8)
        ax.set(xlabel="time (s)", title="Tag scores over time")
        return save(fig, Path(path))


def timeline(tagger: Tagger, path: str | Path, window: float = 2.0, hop: float = 1.0) -> Timeline:
    """Score every `window`-second stretch of a recording, `hop` seconds apart,
    the last window flush with the end; times are those of whole frames."""
    if window <= 0 or hop <= 0:
        raise ConfigError("window and hop must be positive")
    configs = tagger.feature_configs
    whole, error = clip_features(str(path), [replace(c, trim_db=None) for c in configs])
    if whole is None:
        raise AudioError(path, error)
    specs, starts, length = {}, None, window
    for config, spec in zip(configs, whole):
        fps = config.sample_rate / config.hop_length
        size = max(8, round(window * fps))
        first = tile_starts(spec.shape[1], size, max(1, round(hop * fps)))
        specs[config] = [spec[:, s : s + size] for s in first]
        if starts is None:  # times follow the first front end's frames
            starts, length = np.asarray(first) / fps, size / fps
    n = min(len(v) for v in specs.values())
    clips = [{c: v[i] for c, v in specs.items()} for i in range(n)]
    return Timeline(starts[:n], length, tagger.score_clips(clips), tagger.classes)

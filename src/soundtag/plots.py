"""Figures a person would rather look at than read. Figures are drawn without
pyplot, so plotting never switches the caller's matplotlib backend."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from matplotlib.figure import Figure

if TYPE_CHECKING:
    from .run import Run


def figure(width: float, height: float, columns: int = 1):
    """A figure of its own (no pyplot state) and its axes."""
    fig = Figure(figsize=(width, height))
    axes = fig.subplots(1, columns)
    return fig, axes


def save(fig: Figure, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    return path


def training_curves(run: Run) -> Path:
    """Loss and the validation figure per epoch, one line per fold."""
    fig, (ax_loss, ax_metric) = figure(10, 4, 2)
    for k in run.trained_folds():
        history = run.history(k)
        ax_loss.plot(history.epoch, history.train_loss, label=f"fold {k} train")
        ax_loss.plot(history.epoch, history.val_loss, "--", label=f"fold {k} validation")
        ax_metric.plot(history.epoch, history[run.metric], label=f"fold {k}")
    ax_loss.set(xlabel="epoch", ylabel="loss", title="Loss")
    ax_metric.set(xlabel="epoch", ylabel=run.metric, title=f"Validation {run.metric}")
    ax_loss.legend(fontsize=7)
    ax_metric.legend(fontsize=7)
    return save(fig, run.curves_path)


def per_class_bars(values: dict[str, float], label: str, path: Path) -> Path:
    """Horizontal bars of a per-class figure, worst class at the bottom."""
    items = sorted(values.items(), key=lambda kv: -kv[1])
    fig, ax = figure(7, 0.22 * len(items) + 1.5)
    ax.barh([c for c, _ in items], [v for _, v in items], color="tab:blue")
    ax.invert_yaxis()
    ax.set_xlim(0, 1)
    ax.tick_params(axis="y", labelsize=7)
    ax.set(xlabel=label, title=f"Per-class {label}")
    return save(fig, path)


def confusion(truth: np.ndarray, predicted: np.ndarray, classes: list[str], path: Path) -> Path:
    """Confusion matrix of single-label predictions, rows normalised."""
    from sklearn.metrics import confusion_matrix  # scikit-learn only for this figure
    matrix = confusion_matrix(truth, predicted, labels=range(len(classes))).astype(float)
    matrix /= np.maximum(matrix.sum(1, keepdims=True), 1)
    size = 0.3 * len(classes) + 3
    fig, ax = figure(size, size)
    im = ax.imshow(matrix, cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(len(classes)), classes, rotation=90, fontsize=7)
    ax.set_yticks(range(len(classes)), classes, fontsize=7)
    ax.set(xlabel="predicted", ylabel="true", title="Confusion matrix (row-normalised)")
    fig.colorbar(im, ax=ax, fraction=0.046)
    return save(fig, path)

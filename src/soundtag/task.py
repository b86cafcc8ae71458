"""Single- vs multi-label: the one place that decides the loss, the activation,
the metric that picks the best epoch, and how figures are read.

A loss is an entry of the `LOSSES` registry: `loss(logits, targets, smoothing, **params)`
returns one value per clip, and `Task.loss` takes the per-clip weighted mean.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from . import metrics
from .errors import ConfigError
from .registry import Registry

Loss = Callable[..., torch.Tensor]
LOSSES: Registry[Loss] = Registry("loss", plural="losses")


@LOSSES.register("bce")
def binary_cross_entropy(logits: torch.Tensor, y: torch.Tensor, smoothing: float = 0.0) -> torch.Tensor:
    """Per-class BCE with logits, averaged over classes; smoothing towards 1/2."""
    y = y * (1 - smoothing) + smoothing / 2
    return F.binary_cross_entropy_with_logits(logits, y, reduction="none").mean(1)


@LOSSES.register("cross_entropy")
def cross_entropy(logits: torch.Tensor, y: torch.Tensor, smoothing: float = 0.0) -> torch.Tensor:
    """Softmax cross-entropy against (soft) targets; smoothing towards uniform."""
    y = y * (1 - smoothing) + smoothing / y.shape[1]
    return -(y * F.log_softmax(logits, dim=1)).sum(1)


def check_loss(name: str | None, params: dict[str, Any]) -> None:
    """Fail before training on an unknown loss or parameter."""
    if name is None:
        if params:
            raise ConfigError("loss_params given without a loss: name the loss they are for")
        return
    accepted = [p for p in inspect.signature(LOSSES.get(name)).parameters if p not in ("logits", "y", "smoothing")]
    unknown = sorted(set(params) - set(accepted))
    if unknown:
        raise ConfigError(f"loss {name!r} got unknown parameter(s) {', '.join(unknown)}; "
                          f"accepted: {', '.join(accepted) or 'none'}")


@dataclass(frozen=True)
class Task:
    """What kind of tagging a class list is trained for."""

    multilabel: bool

    @property
    def metric(self) -> str:
        """The validation figure that picks the best epoch."""
        return "lwlrap" if self.multilabel else "map@3"

    @property
    def default_loss(self) -> str:
        return "bce" if self.multilabel else "cross_entropy"

    @property
    def per_class_figure(self) -> str:
        """The per-class figure plotted by `evaluate`."""
        return "lwlrap" if self.multilabel else "ap"

    def score(self, truth: np.ndarray, scores: np.ndarray) -> float:
        """The task's figure of merit."""
        return metrics.lwlrap(truth, scores) if self.multilabel else metrics.map_at_k(truth, scores, 3)

    def activate(self, logits: np.ndarray) -> np.ndarray:
        """Scores from logits: sigmoid for multi-label sets, softmax otherwise."""
        t = torch.from_numpy(np.ascontiguousarray(logits, np.float32))
        return self.activate_tensor(t).numpy()

    def activate_tensor(self, logits: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(logits) if self.multilabel else torch.softmax(logits, dim=1)

    def loss(self, logits: torch.Tensor, y: torch.Tensor, weights: torch.Tensor | None = None,
             smoothing: float = 0.0, name: str | None = None, params: dict[str, Any] | None = None) -> torch.Tensor:
        """The (per-clip weighted) mean of loss `name` (default: the task's)."""
        per_clip = LOSSES.get(name or self.default_loss)(logits, y, smoothing, **(params or {}))
        return per_clip.mean() if weights is None else (per_clip * weights).sum() / weights.sum()

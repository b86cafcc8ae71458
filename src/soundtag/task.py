"""Single- vs multi-label: the one place that decides the loss, the activation,
the metric that picks the best epoch, and how figures are read.

A loss is an entry of the `LOSSES` registry: `loss(logits, targets, smoothing, **params)`
returns one value per clip, and `Task.loss` takes the per-clip weighted mean. A loss
with a `multilabel` parameter is told the task's kind (sigmoid or softmax outputs).
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
GIVEN = ("logits", "y", "smoothing", "multilabel")  # what the task passes, never a config parameter


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


@LOSSES.register("bootstrap_soft")
def bootstrap_soft(logits: torch.Tensor, y: torch.Tensor, smoothing: float = 0.0, beta: float = 0.95,
                   multilabel: bool = False) -> torch.Tensor:
    """Soft bootstrapping (Reed et al., 2015): the task's plain loss against
    beta·y + (1 − beta)·p, p the model's own prediction (sigmoids for
    multi-label sets, a softmax otherwise) with its gradient, so that the loss
    adds (1 − beta) times the prediction's entropy: confident predictions
    outvote wrong labels. beta = 1 is the plain loss."""
    if not 0 <= beta <= 1:
        raise ValueError(f"beta must be between 0 and 1, not {beta}")
    plain = binary_cross_entropy if multilabel else cross_entropy
    p = torch.sigmoid(logits) if multilabel else torch.softmax(logits, dim=1)
    return plain(logits, beta * y + (1 - beta) * p, smoothing)


@LOSSES.register("lq")
def lq(logits: torch.Tensor, y: torch.Tensor, smoothing: float = 0.0, q: float = 0.7,
       multilabel: bool = False) -> torch.Tensor:
    """The Lq loss, generalised cross-entropy (Zhang & Sabuncu, 2018): (1 − p^q)/q
    of the probability p given to each target, bounded and so robust to wrong
    labels; q → 0 is cross-entropy, q = 1 the mean absolute error. Multi-label:
    per class on the sigmoid (p of a positive, 1 − p of a negative), averaged."""
    if not 0 < q <= 1:
        raise ValueError(f"q must be above 0 and at most 1, not {q}")
    if multilabel:
        y = y * (1 - smoothing) + smoothing / 2
        hit = y * torch.exp(q * F.logsigmoid(logits)) + (1 - y) * torch.exp(q * F.logsigmoid(-logits))
        return (1 - hit).mean(1) / q
    y = y * (1 - smoothing) + smoothing / y.shape[1]
    return (y * (1 - torch.exp(q * F.log_softmax(logits, dim=1)))).sum(1) / q


def check_loss(name: str | None, params: dict[str, Any]) -> None:
    """Fail before training on an unknown loss, parameter or parameter value."""
    if name is None:
        if params:
            raise ConfigError("loss_params given without a loss: name the loss they are for")
        return
    loss = LOSSES.get(name)
    accepted = [p for p in inspect.signature(loss).parameters if p not in GIVEN]
    unknown = sorted(set(params) - set(accepted))
    if unknown:
        raise ConfigError(f"loss {name!r} got unknown parameter(s) {', '.join(unknown)}; "
                          f"accepted: {', '.join(accepted) or 'none'}")
    try:  # a value out of range or of the wrong kind fails on two clips, not at the first batch
        loss(torch.zeros(2, 3), torch.eye(3)[:2], 0.0, **params, **_told(loss, True))
    except (ValueError, TypeError, RuntimeError) as e:
        raise ConfigError(f"loss {name!r}: {' '.join(str(e).split())}") from None


def _told(loss: Loss, multilabel: bool) -> dict[str, bool]:
    """The task's kind, for a loss that asks for it."""
    return {"multilabel": multilabel} if "multilabel" in inspect.signature(loss).parameters else {}


def weighted_mean(per_clip: torch.Tensor, weights: torch.Tensor | None) -> torch.Tensor:
    return per_clip.mean() if weights is None else (per_clip * weights).sum() / weights.sum()


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
        return weighted_mean(self.clip_losses(logits, y, smoothing, name, params), weights)

    def clip_losses(self, logits: torch.Tensor, y: torch.Tensor, smoothing: float = 0.0, name: str | None = None,
                    params: dict[str, Any] | None = None) -> torch.Tensor:
        """Loss `name` (default: the task's) of each clip."""
        loss = LOSSES.get(name or self.default_loss)
        return loss(logits, y, smoothing, **(params or {}), **_told(loss, self.multilabel))

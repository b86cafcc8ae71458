"""The classical baseline: summary statistics → standardisation → PCA → a linear
head (logistic regression), fitted in closed form on the fold's training clips
instead of trained, and kept as buffers and weights like any network."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import nn

from . import MODELS
from ..errors import ConfigError
from ..features import FeatureConfig
from ..summary import N_MFCC, SummaryBranch, sklearn_threads

if TYPE_CHECKING:
    from ..loader import ClipSet

ABSENT = -30.0  # the logit of a class without positive training clips (never predicted)


@MODELS.register("summary")
class SummaryModel(nn.Module):
    """Log-mel [B, 1, n_mels, frames] → `(logits, embedding)`, the embedding being the
    standardised PCA scores of the clip's summary statistics (`soundtag.summary`).

    `fit` fits scikit-learn's StandardScaler + PCA (`pca_variance` of the variance
    kept) and LogisticRegression (inverse regularisation `C`; softmax over the
    classes for single-label sets, one binary model a class for multi-label ones)
    on whole training clips and copies them into the module.
    """

    INPUT = "logmel"

    def __init__(self, num_classes: int, n_mels: int = 64, features: FeatureConfig | None = None,
                 pca_variance: float = 0.97, C: float = 1.0, n_mfcc: int = N_MFCC) -> None:
        super().__init__()
        if isinstance(C, bool) or not isinstance(C, (int, float)) or not 0 < C < float("inf"):
            raise ConfigError(f"model parameter C (inverse regularisation) must be a positive number, not {C!r}")
        self.C = float(C)
        self.summary = SummaryBranch(features or FeatureConfig(n_mels=n_mels), pca_variance, n_mfcc)
        self.head = nn.Linear(self.summary.dims, num_classes)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        embedding = self.summary(x)
        return self.head(embedding), embedding

    def fit(self, clips: ClipSet, multilabel: bool) -> None:
        """Fit the projection and the head on whole clips, with their loss weights."""
        z = self.summary.fit(clips.spec, clips.lengths)
        with sklearn_threads():
            weight, bias = (_one_vs_rest if multilabel else _multinomial)(z, clips.targets, clips.weights, self.C)
        with torch.no_grad():
            self.head.weight.copy_(torch.from_numpy(weight))
            self.head.bias.copy_(torch.from_numpy(bias))


def _logistic(z: np.ndarray, y: np.ndarray, weights: np.ndarray, C: float):
    from sklearn.linear_model import LogisticRegression
    return LogisticRegression(C=C, max_iter=1000).fit(z, y, sample_weight=weights)


def _multinomial(z: np.ndarray, targets: np.ndarray, weights: np.ndarray, C: float) -> tuple[np.ndarray, np.ndarray]:
    """Head weights [classes, dims] and biases of a softmax regression on the clips' classes."""
    weight, bias = np.zeros((targets.shape[1], z.shape[1])), np.full(targets.shape[1], ABSENT)
    y = targets.argmax(1)
    present = np.unique(y)
    if len(present) == 1:
        bias[present] = 0.0
    elif len(present) == 2:  # scikit-learn fits one row: the second class's logit against the first's
        lr = _logistic(z, y, weights, C)
        weight[present[1]], bias[present] = lr.coef_[0], [0.0, lr.intercept_[0]]
    else:
        lr = _logistic(z, y, weights, C)
        weight[present], bias[present] = lr.coef_, lr.intercept_
    return weight, bias


def _one_vs_rest(z: np.ndarray, targets: np.ndarray, weights: np.ndarray, C: float) -> tuple[np.ndarray, np.ndarray]:
    """Head weights and biases of one binary logistic regression a class."""
    weight, bias = np.zeros((targets.shape[1], z.shape[1])), np.full(targets.shape[1], ABSENT)
    for c, y in enumerate(targets.T > 0.5):
        if y.all():
            bias[c] = -ABSENT
        elif y.any():
            lr = _logistic(z, y, weights, C)
            weight[c], bias[c] = lr.coef_[0], lr.intercept_[0]
    return weight, bias

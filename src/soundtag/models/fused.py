"""A CNN fused with the summary-statistics branch (the FSDKaggle2018 8th-place
recipe): the backbone's pooled embedding joined by the standardised PCA scores
of the clip's summary statistics, before a new head."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from . import MODELS, create_model
from .common import Dropout
from ..errors import ConfigError
from ..features import FeatureConfig
from ..summary import N_MFCC, SummaryBranch

if TYPE_CHECKING:
    from ..loader import ClipSet


@MODELS.register("fused")
class Fused(nn.Module):
    """`backbone` (a spectrogram family, built with `backbone_params`) without its
    head; its embedding and the summary branch's scores [B, E + dims], after the
    backbone's dropout, feed the head. The branch's standardisation and PCA
    (`pca_variance` of the variance kept) are fitted on the fold's training clips
    by `prepare`, before training. Returns `(logits, joined embedding, *extra)`
    (a backbone's auxiliary heads pass through in training).
    """

    INPUT = "logmel"

    def __init__(self, num_classes: int, n_mels: int = 64, features: FeatureConfig | None = None,
                 backbone: str = "cnn6", backbone_params: dict[str, Any] | None = None,
                 pca_variance: float = 0.97, n_mfcc: int = N_MFCC) -> None:
        super().__init__()
        features = features or FeatureConfig(n_mels=n_mels)
        if getattr(MODELS.get(backbone), "INPUT", "spectrogram") != "spectrogram":  # waveform, summary, fused
            raise ConfigError(f"fused parameter backbone must be a spectrogram network, not {backbone!r}")
        if not isinstance(backbone_params, (dict, type(None))):
            raise ConfigError(f"fused parameter backbone_params must be a mapping, not {backbone_params!r}")
        self.backbone = create_model(backbone, num_classes, features, n_mels=n_mels, **(backbone_params or {}))
        embed = self.backbone.head.in_features
        self.backbone.head = nn.Identity()  # the backbone then returns (dropout(embedding), embedding, ...)
        dropout = getattr(self.backbone, "dropout", None)
        self.dropout = Dropout(dropout.p if isinstance(dropout, nn.Dropout) else 0.0)
        self.summary = SummaryBranch(features, pca_variance, n_mfcc)
        self.head = nn.Linear(embed + self.summary.dims, num_classes)

    def forward(self, x: torch.Tensor):
        _, embedding, *extra = self.backbone(x)
        joined = torch.cat([embedding, self.summary(x).to(embedding.dtype)], dim=1)
        return (self.head(self.dropout(joined)), joined, *extra)

    def prepare(self, clips: ClipSet) -> None:
        """Fit the branch's standardisation and PCA on whole training clips."""
        self.summary.fit(clips.spec, clips.lengths)

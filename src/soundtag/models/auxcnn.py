"""The FSDKaggle2019 winner's CNN: four conv blocks with CBAM attention (Woo et al.
2018), skip branches from the first three blocks pooled and projected to the last
block's width, an MLP head, and auxiliary classifiers on the skip branches trained
with their own loss weights."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from . import MODELS
from .common import (Act, Dropout, GlobalPool, MelNorm, activation, conv_stack, deltas_layer, fc_neck,
                     input_channels, pool2x2, stage_channels)
from ..errors import ConfigError

SKIPS = 3


class CBAM(nn.Module):
    """Channel attention (a shared MLP on the mean- and max-pooled map), then
    spatial attention (a 7×7 conv on the channel mean and max), each a sigmoid gate."""

    def __init__(self, channels: int, act: Act, reduction: int = 16) -> None:
        super().__init__()
        inner = max(1, channels // reduction)
        self.mlp = nn.Sequential(nn.Conv2d(channels, inner, 1), act(), nn.Conv2d(inner, channels, 1))
        self.spatial = nn.Conv2d(2, 1, 7, padding=3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate = self.mlp(x.mean(dim=(2, 3), keepdim=True)) + self.mlp(x.amax(dim=(2, 3), keepdim=True))
        x = x * torch.sigmoid(gate)
        where = torch.cat([x.mean(dim=1, keepdim=True), x.amax(dim=1, keepdim=True)], dim=1)
        return x * torch.sigmoid(self.spatial(where))


@MODELS.register("auxcnn")
class AuxCNN(nn.Module):
    """Blocks of 2 conv-BN layers → CBAM → 2×2 avg pool; blocks 1–3 also feed a
    skip branch (mean+max pooling → linear to the last width → activation) that
    joins the last block's pooled features and has a classifier of its own.

    `aux_weights` are the loss weights of the skip classifiers of blocks 1, 2, 3
    (the main head's is 1); in eval mode the model returns `(logits, embedding)`.
    """

    def __init__(
        self, num_classes: int, n_mels: int = 64, width: float = 1.0, dropout: float = 0.2,
        act: str = "relu", aux_weights: Sequence[float] = (0.1, 0.2, 0.4), deltas: int = 0,
    ) -> None:
        super().__init__()
        if len(aux_weights) != SKIPS or not all(isinstance(w, (int, float)) and w >= 0 for w in aux_weights):
            raise ConfigError(f"auxcnn parameter aux_weights needs {SKIPS} loss weights ≥ 0 (blocks 1, 2, 3), "
                              f"not {list(aux_weights)!r}")
        fn = activation(act)
        chans = stage_channels(width)
        c = chans[-1]
        self.aux_weights = [float(w) for w in aux_weights]
        self.bn0 = MelNorm(n_mels)
        self.deltas = deltas_layer(deltas)
        self.blocks = nn.ModuleList(
            nn.Sequential(conv_stack(c_in, c_out, act=fn), CBAM(c_out, fn))
            for c_in, c_out in zip([input_channels(deltas), *chans], chans))
        self.down = pool2x2()
        self.pool = GlobalPool()
        self.skips = nn.ModuleList(nn.Sequential(nn.Linear(ci, c), fn()) for ci in chans[:SKIPS])
        self.neck = fc_neck(c, c, dropout, fn)
        self.dropout = Dropout(dropout)
        self.head = nn.Linear(c, num_classes)
        self.aux_heads = nn.ModuleList(nn.Linear(c, num_classes) for _ in range(SKIPS))

    def forward(self, x: torch.Tensor):
        x = self.deltas(self.bn0(x))
        skips = []
        for i, block in enumerate(self.blocks):
            x = block(x if i == 0 else self.down(x))
            if i < SKIPS:
                skips.append(self.skips[i](self.pool(x)))
        embedding = self.neck(self.pool(x) + sum(skips))
        logits = self.head(self.dropout(embedding))
        if not self.training:
            return logits, embedding
        aux = [(w, head(self.dropout(s))) for w, head, s in zip(self.aux_weights, self.aux_heads, skips)]
        return logits, embedding, aux

"""A raw-waveform 1-D CNN (after Dai et al. 2017, "Very deep CNNs for raw
waveforms", M11): a wide strided first convolution, then stages of 3-tap
conv-BN layers with 4× max pooling between them. Its input is the `waveform`
front end: [B, 1, 1, samples]."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from . import MODELS
from .common import Act, Dropout, activation, scaled
from ..errors import ConfigError

STAGES = (64, 128, 256, 512)


def conv1d_bn(c_in: int, c_out: int, kernel: int, stride: int, act: Act) -> nn.Sequential:
    return nn.Sequential(nn.Conv1d(c_in, c_out, kernel, stride, kernel // 2, bias=False), nn.BatchNorm1d(c_out), act())


def pool4() -> nn.MaxPool1d:
    """4× max pooling in ceil mode: a single position stays one."""
    return nn.MaxPool1d(4, ceil_mode=True)


@MODELS.register("wavecnn")
class WaveCNN(nn.Module):
    """BatchNorm on the samples → conv (`kernel` taps, stride 4) → pool → 4 stages of
    `convs` 3-tap convs (pooled between) → mean+max over time → dense (embedding) → head."""

    INPUT = "waveform"

    def __init__(
        self, num_classes: int, n_mels: int = 1, width: float = 1.0, dropout: float = 0.2, act: str = "relu",
        kernel: int = 80, convs: Sequence[int] = (2, 2, 3, 2),
    ) -> None:
        super().__init__()
        if n_mels != 1:
            raise ConfigError(f"model 'wavecnn' takes the waveform (one feature row), not {n_mels} rows; "
                              "use features: {kind: waveform, hop_length: 1}")
        if len(convs) != len(STAGES) or not all(isinstance(n, int) and n >= 1 for n in convs):
            raise ConfigError(f"wavecnn parameter convs lists the convolutions of its {len(STAGES)} stages "
                              f"(each ≥ 1), not {list(convs)!r}")
        if not isinstance(kernel, int) or kernel < 4:
            raise ConfigError(f"wavecnn parameter kernel must be a whole number of samples ≥ 4, not {kernel!r}")
        fn = activation(act)
        chans = [scaled(c, width) for c in STAGES]
        layers: list[nn.Module] = [conv1d_bn(1, chans[0], kernel, 4, fn), pool4()]
        for i, (c_in, c_out, n) in enumerate(zip([chans[0], *chans], chans, convs)):
            layers += [pool4()] if i else []
            layers += [conv1d_bn(c_in if j == 0 else c_out, c_out, 3, 1, fn) for j in range(n)]
        c = chans[-1]
        self.bn0 = nn.BatchNorm1d(1)
        self.features = nn.Sequential(*layers)
        self.neck = nn.Sequential(Dropout(dropout), nn.Linear(2 * c, c), fn())
        self.dropout = Dropout(dropout)
        self.head = nn.Linear(c, num_classes)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:  # [B, 1, 1, samples]
        x = self.features(self.bn0(x.flatten(1, 2)))
        embedding = self.neck(torch.cat([x.mean(dim=2), x.amax(dim=2)], dim=1))
        return self.head(self.dropout(embedding)), embedding

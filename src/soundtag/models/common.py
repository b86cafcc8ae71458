"""Building blocks shared by the model families."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def scaled(channels: int, width: float, divisor: int = 8) -> int:
    """Scale a channel count by ``width``, rounded to a multiple of ``divisor`` (MobileNet rule)."""
    target = channels * width
    value = max(divisor, int(target + divisor / 2) // divisor * divisor)
    return value + divisor if value < 0.9 * target else value


def stage_channels(width: float, stages: int = 4, base: int = 64) -> list[int]:
    """Channels of a CNN that doubles its width at every stage: 64, 128, 256, 512 (× width)."""
    return [scaled(base * 2**i, width) for i in range(stages)]


def conv_bn(
    c_in: int,
    c_out: int,
    kernel: int = 3,
    stride: int = 1,
    groups: int = 1,
    act: type[nn.Module] | None = nn.ReLU,
) -> nn.Sequential:
    """Conv (no bias, 'same' padding) → BatchNorm → optional activation."""
    layers: list[nn.Module] = [
        nn.Conv2d(c_in, c_out, kernel, stride, kernel // 2, groups=groups, bias=False),
        nn.BatchNorm2d(c_out),
    ]
    if act is not None:
        layers.append(act(inplace=True))
    return nn.Sequential(*layers)


def conv_stack(c_in: int, c_out: int, kernel: int = 3, convs: int = 2) -> nn.Sequential:
    """``convs`` conv-BN-ReLU layers, the first one changing the channel count."""
    return nn.Sequential(*(conv_bn(c_in if i == 0 else c_out, c_out, kernel) for i in range(convs)))


def pool2x2() -> nn.AvgPool2d:
    """2×2 average pooling in ceil mode: an axis of size 1 stays 1, so short clips survive."""
    return nn.AvgPool2d(2, ceil_mode=True, count_include_pad=False)


def fc_neck(c_in: int, c_out: int, dropout: float) -> nn.Sequential:
    """Dropout → Linear → ReLU, producing the embedding."""
    return nn.Sequential(nn.Dropout(dropout), nn.Linear(c_in, c_out), nn.ReLU(inplace=True))


class MelNorm(nn.Module):
    """BatchNorm with mel bins as channels, normalising raw log-mel dB input per bin."""

    def __init__(self, n_mels: int) -> None:
        super().__init__()
        self.bn = nn.BatchNorm2d(n_mels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(x.transpose(1, 2)).transpose(1, 2)


class GlobalPool(nn.Module):
    """Mean over frequency, then mean and max over time, summed or concatenated."""

    def __init__(self, concat: bool = False) -> None:
        super().__init__()
        self.concat = concat

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B, C, F, T] -> [B, C] or [B, 2C]
        # the frequency mean as a pooling layer: ONNX Runtime runs it in its blocked
        # layout, many times faster than ReduceMean (the mel axis is fixed in exports)
        x = F.avg_pool2d(x, (int(x.shape[2]), 1)).squeeze(2)
        mean, peak = x.mean(dim=2), x.amax(dim=2)
        return torch.cat([mean, peak], dim=1) if self.concat else mean + peak


class TaggerNet(nn.Module):
    """Mel BatchNorm → features → global pooling → neck (embedding) → dropout → linear head.

    ``forward`` maps log-mel [B, 1, n_mels, frames] to ``(logits [B, classes], embedding [B, D])``.
    """

    def __init__(
        self,
        n_mels: int,
        features: nn.Module,
        pool: GlobalPool,
        neck: nn.Module,
        embed_dim: int,
        num_classes: int,
        dropout: float,
    ) -> None:
        super().__init__()
        self.bn0 = MelNorm(n_mels)
        self.features = features
        self.pool = pool
        self.neck = neck
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(embed_dim, num_classes)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        embedding = self.neck(self.pool(self.features(self.bn0(x))))
        return self.head(self.dropout(embedding)), embedding


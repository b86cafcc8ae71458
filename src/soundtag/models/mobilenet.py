"""MobileNetV2 (Sandler et al. 2018) behind a learned 1→3 channel adapter."""

from __future__ import annotations

import torch
from torch import nn

from . import MODELS
from .common import Act, GlobalPool, TaggerNet, activation, conv_bn, input_channels, scaled

# (expansion t, channels c, repeats n, first stride s), MobileNetV2 table 2.
SETTINGS = (
    (1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2),
    (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1),
)


class InvertedResidual(nn.Module):
    """1×1 expand → 3×3 depthwise → 1×1 linear projection, residual when shapes match."""

    def __init__(self, c_in: int, c_out: int, stride: int, expand: int, act: Act) -> None:
        super().__init__()
        hidden = c_in * expand
        layers = [conv_bn(c_in, hidden, 1, act=act)] if expand != 1 else []
        layers += [
            conv_bn(hidden, hidden, 3, stride, groups=hidden, act=act),
            conv_bn(hidden, c_out, 1, act=None),
        ]
        self.block = nn.Sequential(*layers)
        self.residual = stride == 1 and c_in == c_out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.block(x) if self.residual else self.block(x)


@MODELS.register("mobilenetv2")
class MobileNetV2(TaggerNet):
    """Adapter (1×1 convs 1→10→3) → MobileNetV2 features → mean+max pooling → head.

    `act` replaces the network's ReLU6 (the adapter keeps its ReLU)."""

    def __init__(
        self, num_classes: int, n_mels: int = 64, width: float = 1.0, dropout: float = 0.2,
        act: str = "relu6", deltas: int = 0,
    ) -> None:
        fn = activation(act)
        c_in = scaled(32, width)
        layers: list[nn.Module] = [
            conv_bn(input_channels(deltas), 10, 1), nn.Conv2d(10, 3, 1),  # learned 1→3 channel adapter
            conv_bn(3, c_in, 3, 2, act=fn),
        ]
        for t, c, n, s in SETTINGS:
            c_out = scaled(c, width)
            for i in range(n):
                layers.append(InvertedResidual(c_in, c_out, s if i == 0 else 1, t, fn))
                c_in = c_out
        c_last = scaled(1280, max(1.0, width))
        layers.append(conv_bn(c_in, c_last, 1, act=fn))
        super().__init__(
            n_mels, nn.Sequential(*layers), GlobalPool(), nn.Identity(),
            c_last, num_classes, dropout, deltas,
        )

"""Small ResNet (He et al. 2016) with BasicBlocks and a light 3×3 stem for spectrograms."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from . import MODELS
from .common import (Act, GlobalPool, TaggerNet, activation, conv_bn, input_channels, pool2x2,
                     stage_channels)


class BasicBlock(nn.Module):
    """Two 3×3 conv-BN layers plus an identity (or 1×1 projection) shortcut."""

    def __init__(self, c_in: int, c_out: int, stride: int, act: Act) -> None:
        super().__init__()
        self.body = nn.Sequential(
            conv_bn(c_in, c_out, 3, stride, act=act), conv_bn(c_out, c_out, 3, act=None)
        )
        same = stride == 1 and c_in == c_out
        self.shortcut = nn.Identity() if same else conv_bn(c_in, c_out, 1, stride, act=None)
        self.act = act()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.body(x) + self.shortcut(x))


@MODELS.register("resnet")
class ResNet(TaggerNet):
    """Stem (3×3 conv, 2×2 avg pool) → BasicBlock stages (stride 2 from the 2nd) → head."""

    def __init__(
        self,
        num_classes: int,
        n_mels: int = 64,
        layers: Sequence[int] = (2, 2, 2, 2),
        width: float = 1.0,
        dropout: float = 0.0,
        act: str = "relu",
        deltas: int = 0,
    ) -> None:
        chans = stage_channels(width, len(layers))
        fn = activation(act)
        c_in = chans[0]
        modules: list[nn.Module] = [conv_bn(input_channels(deltas), c_in, act=fn), pool2x2()]
        for stage, (c_out, blocks) in enumerate(zip(chans, layers)):
            for i in range(blocks):
                modules.append(BasicBlock(c_in, c_out, 2 if stage and i == 0 else 1, fn))
                c_in = c_out
        super().__init__(
            n_mels, nn.Sequential(*modules), GlobalPool(), nn.Identity(), c_in, num_classes, dropout, deltas
        )

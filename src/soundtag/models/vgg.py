"""VGG-style CNN: 4 blocks of 2 × conv3×3, 64→512 channels ("CNN-model-1" style)."""

from __future__ import annotations

from torch import nn

from . import MODELS
from .common import GlobalPool, TaggerNet, conv_stack, fc_neck, pool2x2, stage_channels


@MODELS.register("vgg")
class VGG(TaggerNet):
    """2×2 average pooling between blocks; mean+max time pooling concatenated → FC → head."""

    def __init__(
        self, num_classes: int, n_mels: int = 64, width: float = 1.0, dropout: float = 0.2
    ) -> None:
        chans = stage_channels(width)
        layers: list[nn.Module] = []
        for i, (c_in, c_out) in enumerate(zip([1, *chans], chans)):
            layers += [pool2x2()] if i else []
            layers.append(conv_stack(c_in, c_out))
        c = chans[-1]
        super().__init__(
            n_mels, nn.Sequential(*layers), GlobalPool(concat=True),
            fc_neck(2 * c, c, dropout), c, num_classes, dropout,
        )

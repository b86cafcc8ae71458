"""PANNs Cnn6 (single 5×5 convs) and Cnn10 (2 × 3×3 convs), 64→512 channels (Kong et al.)."""

from __future__ import annotations

from torch import nn

from . import MODELS
from .common import (Dropout, GlobalPool, TaggerNet, activation, conv_stack, fc_neck, input_channels, pool2x2,
                     stage_channels)

BLOCK_DROPOUT = 0.2


class PannsCnn(TaggerNet):
    """Blocks of conv → 2×2 avg pool → dropout; mean+max pooling → fc1 (embedding) → head."""

    def __init__(
        self, num_classes: int, n_mels: int, width: float, dropout: float,
        kernel: int, convs: int, act: str, deltas: int,
    ) -> None:
        chans = stage_channels(width)
        fn = activation(act)
        blocks = [
            nn.Sequential(
                conv_stack(c_in, c_out, kernel, convs, fn), pool2x2(), Dropout(BLOCK_DROPOUT)
            )
            for c_in, c_out in zip([input_channels(deltas), *chans], chans)
        ]
        c = chans[-1]
        super().__init__(
            n_mels, nn.Sequential(*blocks), GlobalPool(), fc_neck(c, c, dropout, fn),
            c, num_classes, dropout, deltas,
        )


@MODELS.register("cnn6")
class Cnn6(PannsCnn):
    def __init__(
        self, num_classes: int, n_mels: int = 64, width: float = 1.0, dropout: float = 0.5,
        act: str = "relu", deltas: int = 0,
    ) -> None:
        super().__init__(num_classes, n_mels, width, dropout, kernel=5, convs=1, act=act, deltas=deltas)


@MODELS.register("cnn10")
class Cnn10(PannsCnn):
    def __init__(
        self, num_classes: int, n_mels: int = 64, width: float = 1.0, dropout: float = 0.5,
        act: str = "relu", deltas: int = 0,
    ) -> None:
        super().__init__(num_classes, n_mels, width, dropout, kernel=3, convs=2, act=act, deltas=deltas)

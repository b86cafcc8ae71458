"""VGG-style CNNs: blocks of 3×3 conv-BN layers, 64→512 channels.

The default is the FSDKaggle2019 "CNN-model-1" style (4 blocks of 2 convs, average
pooling); `convs: [2, 2, 3, 3, 3]` with `pool: max` is VGG16 with batch
normalisation, and `act: leaky_relu` with `dense_act: selu` the NTU variants
(LeakyReLU convolutions, SELU dense layers).
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

from . import MODELS
from .common import (GlobalPool, TaggerNet, activation, conv_stack, fc_neck, input_channels, max_pool2x2,
                     pool2x2, scaled)
from ..errors import ConfigError

POOLS = {"avg": pool2x2, "max": max_pool2x2}
MAX_CHANNELS = 512


@MODELS.register("vgg")
class VGG(TaggerNet):
    """2×2 pooling between blocks; mean+max time pooling concatenated → dense layers → head."""

    def __init__(
        self, num_classes: int, n_mels: int = 64, width: float = 1.0, dropout: float = 0.2,
        convs: Sequence[int] = (2, 2, 2, 2), pool: str = "avg", act: str = "relu",
        dense_act: str | None = None, dense_layers: int = 1, deltas: int = 0,
    ) -> None:
        _check(convs, pool, dense_layers)
        chans = [scaled(min(64 * 2**i, MAX_CHANNELS), width) for i in range(len(convs))]
        conv_act, dense = activation(act), activation(dense_act or act)
        layers: list[nn.Module] = []
        for i, (c_in, c_out, n) in enumerate(zip([input_channels(deltas), *chans], chans, convs)):
            layers += [POOLS[pool]()] if i else []
            layers.append(conv_stack(c_in, c_out, convs=n, act=conv_act))
        c = chans[-1]
        neck = [m for i in range(dense_layers) for m in fc_neck(2 * c if i == 0 else c, c, dropout, dense)]
        super().__init__(
            n_mels, nn.Sequential(*layers), GlobalPool(concat=True),
            nn.Sequential(*neck), c, num_classes, dropout, deltas,
        )


def _check(convs: Sequence[int], pool: str, dense_layers: int) -> None:
    if not convs or not all(isinstance(n, int) and n >= 1 for n in convs):
        raise ConfigError(f"vgg parameter convs must list at least one block's number of convolutions "
                          f"(each ≥ 1), e.g. [2, 2, 3, 3, 3] for VGG16; not {list(convs)!r}")
    if pool not in POOLS:
        raise ConfigError(f"vgg parameter pool must be one of {', '.join(POOLS)}, not {pool!r}")
    if not isinstance(dense_layers, int) or dense_layers < 1:
        raise ConfigError(f"vgg parameter dense_layers must be a whole number ≥ 1, not {dense_layers!r}")

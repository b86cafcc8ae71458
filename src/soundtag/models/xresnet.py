"""XResNet (He et al. 2019, "Bag of Tricks", ResNet-D as in fastai): a stem of three
3×3 convs, average pooling on downsampling shortcuts and zero-initialised last
BatchNorms; depths 18, 34 (BasicBlocks) and 50 (Bottlenecks). Options from the
fastai FSDKaggle2019 write-up: any activation (`act: mish`), SAGAN self-attention
after chosen stages (`attention: [3]`) and MaxBlurPool in the stem (`pool: maxblur`)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from . import MODELS
from .common import Act, GlobalPool, TaggerNet, activation, conv_bn, input_channels, scaled
from ..errors import ConfigError

DEPTHS = {18: (1, (2, 2, 2, 2)), 34: (1, (3, 4, 6, 3)), 50: (4, (3, 4, 6, 3))}  # expansion, blocks a stage
STEM = (32, 32, 64)
STAGES = (64, 128, 256, 512)


class MaxBlurPool(nn.Module):
    """Anti-aliased max pooling (Zhang 2019): a 3×3 max at stride 1, then a 3×3
    binomial blur at stride 2 (edges repeated); an axis of n becomes ⌈n/2⌉."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        taps = torch.tensor([1.0, 2.0, 1.0])
        blur = (taps[:, None] * taps[None, :]) / 16
        self.register_buffer("blur", blur.expand(channels, 1, 3, 3).contiguous(), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.max_pool2d(x, 3, 1, 1)
        return F.conv2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), self.blur.to(x.dtype), stride=2,
                        groups=x.shape[1])


class SelfAttention(nn.Module):
    """SAGAN self-attention (Zhang et al. 2019) over every position of a feature
    map; its output joins the input through a learned scale that starts at 0."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        inner = max(1, channels // 8)
        self.query = nn.Conv2d(channels, inner, 1)
        self.key = nn.Conv2d(channels, inner, 1)
        self.value = nn.Conv2d(channels, channels, 1)
        self.gamma = nn.Parameter(torch.zeros(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = (layer(x).flatten(2) for layer in (self.query, self.key, self.value))  # [B, C', N]
        attention = torch.softmax(q.transpose(1, 2) @ k, dim=-1)  # [B, N, N]
        return x + self.gamma * (v @ attention.transpose(1, 2)).view_as(x)


class ResBlock(nn.Module):
    """A BasicBlock (expansion 1) or Bottleneck (expansion 4) with a ResNet-D
    shortcut: 2×2 average pooling, then a 1×1 conv where the width changes."""

    def __init__(self, c_in: int, width: int, expansion: int, stride: int, act: Act) -> None:
        super().__init__()
        c_out = width * expansion
        if expansion == 1:
            body = [conv_bn(c_in, width, 3, stride, act=act), conv_bn(width, c_out, 3, act=None)]
        else:
            body = [conv_bn(c_in, width, 1, act=act), conv_bn(width, width, 3, stride, act=act),
                    conv_bn(width, c_out, 1, act=None)]
        nn.init.zeros_(body[-1][1].weight)  # each block starts as the identity
        self.body = nn.Sequential(*body)
        shortcut: list[nn.Module] = [nn.AvgPool2d(2, ceil_mode=True, count_include_pad=False)] if stride > 1 else []
        shortcut += [conv_bn(c_in, c_out, 1, act=None)] if c_in != c_out else []
        self.shortcut = nn.Sequential(*shortcut)
        self.act = act()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.body(x) + self.shortcut(x))


@MODELS.register("xresnet")
class XResNet(TaggerNet):
    """Stem (3 convs, the first at stride 2) → 3×3 max (or MaxBlur) pool → 4 stages → mean+max pooling → head."""

    def __init__(
        self, num_classes: int, n_mels: int = 64, depth: int = 18, width: float = 1.0, dropout: float = 0.0,
        act: str = "relu", attention: Sequence[int] = (), pool: str = "max", deltas: int = 0,
    ) -> None:
        _check(depth, attention, pool)
        expansion, blocks = DEPTHS[depth]
        fn = activation(act)
        stem = [scaled(c, width) for c in STEM]
        layers: list[nn.Module] = [conv_bn(c_in, c_out, 3, 2 if i == 0 else 1, act=fn)
                                   for i, (c_in, c_out) in enumerate(zip([input_channels(deltas), *stem], stem))]
        layers.append(MaxBlurPool(stem[-1]) if pool == "maxblur" else nn.MaxPool2d(3, 2, 1))
        c_in = stem[-1]
        for stage, (c, n) in enumerate(zip(STAGES, blocks), start=1):
            for i in range(n):
                layers.append(ResBlock(c_in, scaled(c, width), expansion, 2 if stage > 1 and i == 0 else 1, fn))
                c_in = scaled(c, width) * expansion
            layers += [SelfAttention(c_in)] if stage in attention else []
        super().__init__(n_mels, nn.Sequential(*layers), GlobalPool(), nn.Identity(), c_in, num_classes,
                         dropout, deltas)


def _check(depth: int, attention: Sequence[int], pool: str) -> None:
    if depth not in DEPTHS:
        raise ConfigError(f"xresnet parameter depth must be one of {', '.join(map(str, DEPTHS))}, not {depth!r}")
    if not all(stage in (1, 2, 3, 4) for stage in attention):
        raise ConfigError(f"xresnet parameter attention lists stages (1 to 4) to follow with self-attention, "
                          f"not {list(attention)!r}")
    if pool not in ("max", "maxblur"):
        raise ConfigError(f"xresnet parameter pool must be max or maxblur, not {pool!r}")

"""Building blocks shared by the model families."""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError
from ..registry import Registry

Act = Callable[[], nn.Module]
ACTIVATIONS: Registry[Act] = Registry("activation")
RELU = ACTIVATIONS.add("relu", partial(nn.ReLU, inplace=True))
ACTIVATIONS.add("relu6", partial(nn.ReLU6, inplace=True))
ACTIVATIONS.add("leaky_relu", partial(nn.LeakyReLU, 0.1, inplace=True))
ACTIVATIONS.add("mish", nn.Mish)
ACTIVATIONS.add("selu", partial(nn.SELU, inplace=True))
ACTIVATIONS.add("silu", partial(nn.SiLU, inplace=True))
DELTA_ORDERS = (0, 1, 2)


def activation(name: str) -> Act:
    """The activation called `name` (every family's `act` parameter)."""
    try:
        return ACTIVATIONS.get(name)
    except ConfigError as e:
        raise ConfigError(f"model parameter act: {e}") from None


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
    act: Act | None = RELU,
) -> nn.Sequential:
    """Conv (no bias, 'same' padding) → BatchNorm → optional activation."""
    layers: list[nn.Module] = [
        nn.Conv2d(c_in, c_out, kernel, stride, kernel // 2, groups=groups, bias=False),
        nn.BatchNorm2d(c_out),
    ]
    if act is not None:
        layers.append(act())
    return nn.Sequential(*layers)


def conv_stack(c_in: int, c_out: int, kernel: int = 3, convs: int = 2,
               act: Act = RELU) -> nn.Sequential:
    """``convs`` conv-BN-activation layers, the first one changing the channel count."""
    return nn.Sequential(*(conv_bn(c_in if i == 0 else c_out, c_out, kernel, act=act) for i in range(convs)))


def pool2x2() -> nn.AvgPool2d:
    """2×2 average pooling in ceil mode: an axis of size 1 stays 1, so short clips survive."""
    return nn.AvgPool2d(2, ceil_mode=True, count_include_pad=False)


class Dropout(nn.Dropout):
    """nn.Dropout whose training mask on a CPU is drawn as bytes from numpy's
    PCG64, seeded from torch's generator, so its rate goes in steps of 1/256:
    torch's CPU Bernoulli draws took about a tenth of a small network's
    training step, and these masks take about a quarter of their time on its
    large activations. On other devices, in place, on a rate within 1/512 of 0 or 1,
    and on inputs that are not dense, it is nn.Dropout."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return x
        dropped = round(self.p * 256)
        dense = x.is_contiguous() or x.is_contiguous(memory_format=torch.channels_last)
        if dropped in (0, 256) or x.device.type != "cpu" or self.inplace or not dense or x.numel() == 0:
            return super().forward(x)
        seed = int(torch.randint(2**62, (1,)))
        words = np.random.default_rng(seed).bit_generator.random_raw(-(-x.numel() // 8))
        draws = torch.from_numpy(words.view(np.uint8)[: x.numel()])
        keep = draws.as_strided(x.shape, x.stride()) >= dropped  # the mask in x's memory layout
        return x * keep * (256 / (256 - dropped))  # NaN and inf stay NaN where dropped, as in nn.Dropout


def max_pool2x2() -> nn.MaxPool2d:
    """2×2 max pooling in ceil mode (an axis of size 1 stays 1)."""
    return nn.MaxPool2d(2, ceil_mode=True)


def fc_neck(c_in: int, c_out: int, dropout: float, act: Act = RELU) -> nn.Sequential:
    """Dropout → Linear → activation, producing the embedding."""
    return nn.Sequential(Dropout(dropout), nn.Linear(c_in, c_out), act())


def input_channels(deltas: int) -> int:
    """Channels a network's first layer takes: the log-mel, plus its deltas (0, 1 or 2 orders)."""
    if deltas not in DELTA_ORDERS:
        raise ConfigError(f"model parameter deltas must be one of {', '.join(map(str, DELTA_ORDERS))} "
                          f"(0: none, 1: deltas, 2: deltas and delta-deltas), not {deltas!r}")
    return 1 + deltas


class Deltas(nn.Module):
    """Stacks `order` successive time derivatives of the input as extra channels:
    [B, 1, F, T] → [B, 1 + order, F, T]. Each is the regression delta over ±2
    frames, (Σₙ n (x[t+n] − x[t−n])) / 10, with the edge frames repeated (HTK's
    formula; `librosa.feature.delta(width=5, mode="nearest")`)."""

    def __init__(self, order: int) -> None:
        super().__init__()
        self.order = order
        kernel = torch.tensor([-2.0, -1.0, 0.0, 1.0, 2.0]) / 10
        self.register_buffer("kernel", kernel.view(1, 1, 1, 5), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = [x]
        for _ in range(self.order):
            out.append(F.conv2d(F.pad(out[-1], (2, 2, 0, 0), mode="replicate"), self.kernel.to(x.dtype)))
        return torch.cat(out, dim=1)


def deltas_layer(order: int) -> nn.Module:
    """The delta stacking of a network's input, or nothing for order 0."""
    input_channels(order)
    return Deltas(order) if order else nn.Identity()


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
    """Mel BatchNorm → deltas (optional) → features → global pooling → neck (embedding) → dropout → head.

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
        deltas: int = 0,
    ) -> None:
        super().__init__()
        self.bn0 = MelNorm(n_mels)
        self.deltas = deltas_layer(deltas)
        self.features = features
        self.pool = pool
        self.neck = neck
        self.dropout = Dropout(dropout)
        self.head = nn.Linear(embed_dim, num_classes)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        embedding = self.neck(self.pool(self.features(self.deltas(self.bn0(x)))))
        return self.head(self.dropout(embedding)), embedding


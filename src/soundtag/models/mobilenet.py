"""MobileNetV2 (Sandler et al. 2018) behind a learned 1→3 channel adapter."""

from __future__ import annotations

import torch
from torch import nn

from . import MODELS
from .common import Act, GlobalPool, TaggerNet, activation, conv_bn, input_channels, scaled

ADAPTER = 10  # hidden channels of the 1→3 adapter

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
            conv_bn(input_channels(deltas), ADAPTER, 1), nn.Conv2d(ADAPTER, 3, 1),  # learned 1→3 channel adapter
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

    @torch.no_grad()
    def fold(self) -> MobileNetV2:
        """The same function in fewer steps, for inference (in place; eval mode):
        the adapter's linear 10→3 projection is folded into the first 3×3
        convolution, which then reads the adapter's 10 hidden channels plus one
        constant 1 (which carries the projection's bias, and is 0 in the
        convolution's zero padding like the projection's output). Skips one
        full-resolution layer; outputs equal to rounding."""
        expand, project, first = self.features[0], self.features[1], self.features[2]
        if not isinstance(project, nn.Conv2d) or project.kernel_size != (1, 1):
            return self  # folded already
        conv, bn = expand[0], expand[1]
        scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
        hidden = nn.Conv2d(conv.in_channels, ADAPTER + 1, 1).to(conv.weight)
        hidden.weight.zero_()
        hidden.weight[:ADAPTER] = conv.weight * scale.view(-1, 1, 1, 1)
        hidden.bias[:ADAPTER] = bn.bias - bn.running_mean * scale
        hidden.bias[ADAPTER] = 1.0  # the constant channel: the adapter's ReLU keeps it 1
        w = first[0].weight  # [out, 3, k, k]
        merged = nn.Conv2d(ADAPTER + 1, w.shape[0], w.shape[2:], first[0].stride, first[0].padding,
                           bias=False).to(w)
        merged.weight[:, :ADAPTER] = torch.einsum("ocij,cn->onij", w, project.weight[:, :, 0, 0])
        merged.weight[:, ADAPTER] = torch.einsum("ocij,c->oij", w, project.bias)
        self.features = nn.Sequential(hidden, expand[2], merged, *first[1:], *self.features[3:])
        return self.eval()

"""The layers a rewrite puts in: an explicit subsampling, 1x1/3x3 convs built from another conv, the avgpool shortcut."""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["Subsample", "avgpool_shortcut", "conv1x1_from", "conv3x3_from", "off_centre_is_zero"]


class Subsample(nn.Module):
    """Keep every ``stride``-th row and column: the exact form of "only these positions are read"."""

    def __init__(self, stride: int = 2):
        super().__init__()
        self.stride = stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x[:, :, :: self.stride, :: self.stride]

    def extra_repr(self) -> str:
        return f"stride={self.stride}"


def conv1x1_from(conv: nn.Conv2d, stride: int) -> nn.Conv2d:
    """A 1x1 conv holding ``conv``'s centre tap (or its weights, when it is already 1x1)."""
    new = nn.Conv2d(conv.in_channels, conv.out_channels, 1, stride=stride, groups=conv.groups,
                    bias=conv.bias is not None).to(conv.weight)
    kh, kw = conv.kernel_size
    new.weight.data.copy_(conv.weight.data[:, :, kh // 2 : kh // 2 + 1, kw // 2 : kw // 2 + 1])
    if conv.bias is not None:
        new.bias.data.copy_(conv.bias.data)
    return new


def conv3x3_from(conv: nn.Conv2d, stride: int) -> nn.Conv2d:
    """A 3x3 stride-s padding-1 conv whose centre tap holds a 1x1 conv's weights: it reads the same pixels."""
    new = nn.Conv2d(conv.in_channels, conv.out_channels, 3, stride=stride, padding=1, groups=conv.groups,
                    bias=conv.bias is not None).to(conv.weight)
    new.weight.data.zero_()
    new.weight.data[:, :, 1:2, 1:2] = conv.weight.data
    if conv.bias is not None:
        new.bias.data.copy_(conv.bias.data)
    return new


def avgpool_shortcut(stride: int) -> nn.AvgPool2d:
    """ResNet-D's shortcut pool: AvgPool2d(stride, stride, ceil_mode=True, count_include_pad=False)."""
    # ceil_mode keeps the output size equal to the strided conv's at odd sizes; count_include_pad=False
    # averages only real pixels at the ragged edge.
    return nn.AvgPool2d(stride, stride, ceil_mode=True, count_include_pad=False)


def off_centre_is_zero(conv: nn.Conv2d) -> bool:
    """Whether every tap of ``conv`` but the centre one is zero (a 1x1 conv stored as a larger kernel)."""
    kh, kw = conv.kernel_size
    w = conv.weight.detach().clone()
    w[:, :, kh // 2, kw // 2] = 0
    return bool((w == 0).all())

"""Spiking ResNets: ResNet-18/34 (torchvision widths), ResNet-19 (TET/tdBN family), ResNet-20 (CIFAR).

Shapes: docs/methods.md, "Models". Stages are ``layer1``, ``layer2``, ...; a block's
add comes before its second neuron (``sew=True``: after it, SEW-ResNet style).
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Sequence

from torch import Tensor, nn

from ..layers import Head, SeqToANN, conv_bn, spiking_conv_stack
from .base import Body, Context

__all__ = ["BasicBlock", "resnet18", "resnet19", "resnet20", "resnet34", "STEMS"]

STEMS = ("cifar", "imagenet")


class BasicBlock(nn.Module):
    """``s = sn1(BN(conv3x3(x)))``; ``out = sn2(BN(conv3x3(s)) + downsample(x))``.

    With ``sew=True``: ``out = sn2(BN(conv3x3(s))) + downsample(x)``, where a projecting
    ``downsample`` ends in its own neuron (so spikes are added to spikes).
    ``[T, B, C_in, H, W]`` -> ``[T, B, C_out, H/stride, W/stride]``.
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int, ctx: Context, sew: bool) -> None:
        super().__init__()
        self.sew = sew
        self.conv1 = conv_bn(in_channels, out_channels, 3, stride, ctx.norm)
        self.sn1 = ctx.neuron()
        self.conv2 = conv_bn(out_channels, out_channels, 3, 1, ctx.norm)
        self.sn2 = ctx.neuron()
        if stride == 1 and in_channels == out_channels:
            self.downsample: nn.Module = nn.Identity()
        elif sew:
            self.downsample = spiking_conv_stack(in_channels, [out_channels], ctx.neuron, norm=ctx.norm,
                                                 stride=stride, kernel_size=1)
        else:
            self.downsample = conv_bn(in_channels, out_channels, 1, stride, ctx.norm)

    def forward(self, x: Tensor) -> Tensor:
        """``x: [T, B, C_in, H, W]`` -> ``[T, B, C_out, H', W']``."""
        s = self.conv1.fire(self.sn1, x)
        if self.sew:
            return self.conv2.fire(self.sn2, s) + self.downsample(x)
        return self.conv2.fire(self.sn2, s, residual=self.downsample(x))


def _stem(ctx: Context, kind: str, channels: int) -> nn.Sequential:
    """``cifar``: 3x3 conv; ``imagenet``: 7x7 stride-2 conv and 3x3 stride-2 max-pooling (each with BN, neuron)."""
    if kind not in STEMS:
        raise ValueError(f"stem must be one of {', '.join(STEMS)}, got {kind!r}")
    if kind == "cifar":
        return spiking_conv_stack(ctx.in_channels, [channels], ctx.neuron, norm=ctx.norm)
    stem = spiking_conv_stack(ctx.in_channels, [channels], ctx.neuron, norm=ctx.norm, stride=2, kernel_size=7)
    stem.add_module("pool", SeqToANN(nn.MaxPool2d(3, 2, 1)))
    return stem


def _resnet(ctx: Context, blocks: Sequence[int], widths: Sequence[int], stem: str, sew: bool,
            hidden: int | None = None) -> Body:
    """Stem of ``widths[0]`` channels, then stages of BasicBlocks; stride 2 opens every stage but the first.

    ``hidden``: width of a spiking linear layer between pooling and classifier (ResNet-19).
    """
    if not isinstance(sew, bool):
        raise ValueError(f"sew must be true or false, got {sew!r}")
    in_channels = ctx.channels(widths[0])
    stem_module = _stem(ctx, stem, in_channels)
    stages = []
    for i, (n, width) in enumerate(zip(blocks, widths), start=1):
        out_channels = ctx.channels(width)
        layer = nn.Sequential(*(BasicBlock(in_channels if j == 0 else out_channels, out_channels,
                                           2 if i > 1 and j == 0 else 1, ctx, sew) for j in range(n)))
        stages.append((f"layer{i}", layer, out_channels))
        in_channels = out_channels
    if hidden is None:
        return Body(stem_module, stages, Head(in_channels, ctx.num_classes))
    features = ctx.channels(hidden)
    mlp = nn.Sequential(OrderedDict(fc=nn.Linear(in_channels, features), sn=ctx.neuron()))
    return Body(stem_module, stages, Head(features, ctx.num_classes, mlp))


def resnet18(ctx: Context, stem: str, sew: bool) -> Body:
    """BasicBlocks [2, 2, 2, 2], widths 64-128-256-512; stages layer1-layer4."""
    return _resnet(ctx, [2, 2, 2, 2], [64, 128, 256, 512], stem, sew)


def resnet34(ctx: Context, stem: str, sew: bool) -> Body:
    """BasicBlocks [3, 4, 6, 3], widths 64-128-256-512; stages layer1-layer4."""
    return _resnet(ctx, [3, 4, 6, 3], [64, 128, 256, 512], stem, sew)


def resnet19(ctx: Context, stem: str, sew: bool) -> Body:
    """Stem 128, BasicBlocks [3, 3, 2] of widths 128-256-512, a 256-unit spiking linear layer; layer1-layer3."""
    return _resnet(ctx, [3, 3, 2], [128, 256, 512], stem, sew, hidden=256)


def resnet20(ctx: Context, stem: str, sew: bool) -> Body:
    """He et al.'s CIFAR shape: stem 16, BasicBlocks [3, 3, 3] of widths 16-32-64; layer1-layer3."""
    return _resnet(ctx, [3, 3, 3], [16, 32, 64], stem, sew)

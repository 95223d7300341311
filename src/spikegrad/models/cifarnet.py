"""CIFARNet: the plain spiking CNN of the MSG paper's CIFAR rows (Li, Zhao, Zhao, Zeng, 2024).

The layer list of the authors' model definition (``CIFARConvNet``): eight 3x3 convolutions
(no bias), each followed by BN and a spiking neuron, in four stages of widths 256-256,
256-256, 512-512 and 1024-1024, with 2x2 average pooling between stages, then global
average pooling and one linear classifier. Stages are ``stage1`` ... ``stage4``; each stage
after the first opens with its pooling, as in ``vgg``.
"""
from __future__ import annotations

from .base import Body, Context, conv_net

__all__ = ["CIFARNET_STAGES", "cifarnet"]

CIFARNET_STAGES = [[256, 256], [256, 256], [512, 512], [1024, 1024]]


def cifarnet(ctx: Context) -> Body:
    """The ``CIFARNET_STAGES`` stacks separated by 2x2 average pooling, global average
    pooling and a linear classifier: ``[T, B, C, 32, 32]`` -> logits ``[T, B, classes]``."""
    return conv_net(ctx, CIFARNET_STAGES, downsample="pool")

"""Spiking VGG-11/16 and VGGSNN: conv stacks separated by 2x2 average pooling.

Stages are the blocks between poolings (``stage1``, ``stage2``, ...); each stage after
the first opens with the pooling (skipped once the map is 1x1), so stage outputs are
spikes. The pooling after the last block is left to the head's global average
pooling, which subsumes it.
"""
from __future__ import annotations

from .base import Body, Context, conv_net

__all__ = ["VGG_STAGES", "vgg"]

VGG_STAGES = {
    "vgg11": [[64], [128], [256, 256], [512, 512], [512, 512]],
    "vgg16": [[64, 64], [128, 128], [256, 256, 256], [512, 512, 512], [512, 512, 512]],
    "vggsnn": [[64, 128], [256, 256], [512, 512], [512, 512]],
}


def vgg(ctx: Context, arch: str) -> Body:
    """The ``VGG_STAGES[arch]`` stacks, then global average pooling and a linear classifier."""
    return conv_net(ctx, VGG_STAGES[arch], downsample="pool")

"""The VGG-11 of the Local Tandem Learning authors' code (Yang et al., NeurIPS 2022): ``ltl-vgg11``.

Eight 3x3 convolutions of 64-128-256-256-512-512-512-512 channels; the 2nd, 4th, 6th and
8th have stride 2 (no pooling), so a 32x32 input ends as a 2x2x512 map. That map is
flattened into two hidden fully connected layers of 512 neurons, each followed by a
spiking neuron (so each gets its own LTL local loss), then a linear classifier.
Stages (``stage1`` ... ``stage5``) open with each stride-2 convolution:
``[64], [128, 256], [256, 512], [512, 512], [512]``; the hidden FC layers live in the
head (``head.hidden``: ``fc1``, ``sn1``, ``fc2``, ``sn2``). Any input size works: the last
map is average-pooled to 2x2 before flattening (the identity for 32x32 and 28x28 inputs).
The authors' student has no BN (``norm="none"``, as the LTL config sets); with ``norm="bn"``
the convolutions get BN and the FC layers do not.
"""
from __future__ import annotations

from collections import OrderedDict

from torch import Tensor, nn
from torch.nn import functional as F

from ..layers import Head, flatten_time, spiking_conv_stack, unflatten_time
from .base import Body, Context

__all__ = ["LTL_VGG_STAGES", "FlattenHead", "ltl_vgg11"]

LTL_VGG_STAGES = [[64], [128, 256], [256, 512], [512, 512], [512]]
MAP = 2  # the last conv map is pooled to MAP x MAP, then flattened
HIDDEN = 512


class FlattenHead(Head):
    """``[T, B, C, H, W]`` -> average pooling to ``MAP x MAP`` -> flatten -> ``hidden`` -> ``fc``."""

    def forward(self, x: Tensor) -> Tensor:
        """``x: [T, B, C, H, W]`` -> ``[T, B, num_classes]``."""
        pooled = unflatten_time(F.adaptive_avg_pool2d(flatten_time(x), MAP), x.shape[0])
        return self.fc(self.hidden(pooled.flatten(2)))


def ltl_vgg11(ctx: Context) -> Body:
    """The LTL authors' VGG-11: stride-2 convs, two hidden FC-512 spiking layers, a linear classifier."""
    stages, in_channels = [], ctx.in_channels
    for i, stage_widths in enumerate(LTL_VGG_STAGES):
        chans = [ctx.channels(w) for w in stage_widths]
        stage = spiking_conv_stack(in_channels, chans, ctx.neuron, norm=ctx.norm, stride=2 if i else 1)
        stages.append((f"stage{i + 1}", stage, chans[-1]))
        in_channels = chans[-1]
    hidden = ctx.channels(HIDDEN)
    layers = nn.Sequential(OrderedDict([
        ("fc1", nn.Linear(in_channels * MAP * MAP, hidden)), ("sn1", ctx.neuron()),
        ("fc2", nn.Linear(hidden, hidden)), ("sn2", ctx.neuron())]))
    return Body(nn.Identity(), stages, FlattenHead(hidden, ctx.num_classes, layers))

"""What every registry model shares: the build context, the body it returns, and ``SpikingNet``."""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Any, NamedTuple, Sequence

from torch import Tensor, nn

from ..layers import ENCODERS, Head, make_neuron, spiking_conv_stack
from ..memory import saved_tensors
from ..surrogate import Surrogate

__all__ = ["Context", "Body", "SpikingNet", "conv_net", "init_gain", "init_weights", "SPIKING_GAIN"]


@dataclass(frozen=True)
class Context:
    """The validated common arguments a builder needs to make its layers."""

    in_channels: int
    num_classes: int
    norm: str
    width: float
    neuron_cfg: dict
    surrogate: Surrogate

    def channels(self, base: int) -> int:
        """``base`` channels scaled by ``width``, rounded, at least 1."""
        return max(1, round(base * self.width))

    def neuron(self) -> nn.Module:
        """A new neuron, sharing the model's surrogate object."""
        return make_neuron(self.neuron_cfg, self.surrogate)


class Body(NamedTuple):
    """What a builder returns: ``stem``, ``stages`` as ``(name, module, channels)`` in order, ``head``."""

    stem: nn.Module
    stages: list[tuple[str, nn.Module, int]]
    head: Head


def conv_net(ctx: Context, widths: Sequence[Sequence[int]], downsample: str) -> Body:
    """A net of plain conv stacks ``stage1, stage2, ...`` (one per entry of ``widths``, base channels).

    No stem; every stage after the first halves the map: ``downsample="pool"`` by 2x2
    average pooling before its first conv, ``"stride"`` by a stride-2 first conv.
    Then global average pooling and a linear classifier.
    """
    stages, in_channels = [], ctx.in_channels
    for i, stage_widths in enumerate(widths):
        chans = [ctx.channels(w) for w in stage_widths]
        later = i > 0
        stage = spiking_conv_stack(in_channels, chans, ctx.neuron, norm=ctx.norm,
                                   stride=2 if later and downsample == "stride" else 1,
                                   pool=later and downsample == "pool")
        stages.append((f"stage{i + 1}", stage, chans[-1]))
        in_channels = chans[-1]
    return Body(nn.Identity(), stages, Head(in_channels, ctx.num_classes))


SPIKING_GAIN = 4.0


def init_gain(norm: str, neuron_cfg: dict) -> float:
    """The weight-init gain: He's sqrt(2) with BN or ANN activations; ``4 * v_threshold`` for
    a spiking net without BN, which keeps firing rates near 0.15-0.4 through 40 layers at
    init (with He's gain they die out after a few layers, and so does the gradient)."""
    if norm == "bn" or neuron_cfg["type"] in ("relu", "clamp"):
        return math.sqrt(2.0)
    return SPIKING_GAIN * neuron_cfg["v_threshold"]


def init_weights(model: "SpikingNet", gain: float) -> None:
    """Weights ~ N(0, gain^2 / fan_in) and zero biases in every conv and hidden linear layer;
    the classifier ``model.head.fc`` keeps PyTorch's default."""
    for m in model.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)) and m is not model.head.fc:
            nn.init.normal_(m.weight, std=gain / math.sqrt(m.weight[0].numel()))
            if m.bias is not None:
                nn.init.zeros_(m.bias)


class SpikingNet(nn.Module):
    """A registry model: encoder -> stem -> stages -> head.

    ``forward(x)``: ``x`` is ``[B, C, H, W]`` (static; encoded to ``[T, B, ...]``) or
    ``[T, B, C, H, W]`` (events); returns per-step logits ``[T, B, num_classes]``.
    Attributes: ``stages`` (where shortcut branches may attach: every stage but the
    last), ``all_stages``, ``stage_channels``, ``T``, ``surrogate`` (shared by every
    neuron), ``num_classes``, ``in_channels`` and ``config`` (``create_model(**config)``
    rebuilds the model), ``compact_spikes`` (default True: spikes saved for backward are
    kept bit-packed, see ``spikegrad.memory``; set it False when your own
    ``saved_tensors_hooks`` wrap the whole forward, e.g. CPU offloading, which the
    model's would shadow).
    """

    def __init__(self, body: Body, encoding: str, T: int, in_channels: int, num_classes: int,
                 surrogate: Surrogate, config: dict[str, Any]) -> None:
        super().__init__()
        self.encoder = ENCODERS[encoding](T)
        self.stem = body.stem
        for name, module, _ in body.stages:
            self.add_module(name, module)
        self.head = body.head
        self.all_stages = [name for name, _, _ in body.stages]
        self.stages = self.all_stages[:-1]
        self.stage_channels = {name: channels for name, _, channels in body.stages}
        self.in_channels = in_channels
        self.num_classes = num_classes
        self.surrogate = surrogate
        self.config = config
        self.compact_spikes = True

    @property
    def T(self) -> int:
        """Time steps (the encoder's)."""
        return self.encoder.T

    def forward(self, x: Tensor, return_stages: bool = False) -> Tensor | tuple[Tensor, list[Tensor]]:
        """Logits ``[T, B, num_classes]``; with ``return_stages=True`` also the outputs of
        ``self.stages`` in order, each ``[T, B, C_l, H_l, W_l]``."""
        seq = self.encoder(x)
        if seq.shape[2] != self.in_channels:
            raise ValueError(f"the model expects {self.in_channels} input channels, got input of shape "
                             f"{tuple(x.shape)}")
        with saved_tensors() if self.compact_spikes else contextlib.nullcontext():
            x = self.stem(seq)
            outputs = []
            for name in self.all_stages:
                x = self._modules[name](x)
                outputs.append(x)
            logits = self.head(x)
        return (logits, outputs[:-1]) if return_stages else logits

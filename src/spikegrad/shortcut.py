"""Shortcut back-propagation (Guo et al., NeurIPS 2024): training-only branches at stage outputs.

    >>> net = ShortcutNet(create_model("resnet18"))       # branches after layer1-3
    >>> main, branches = net(x)                          # training mode: [T, B, K] each
    >>> loss = net.loss(main, branches, y, lam, rate_ce)  # lam from the evolutionary schedule
    >>> plain = net.export()                             # the model alone, for inference

A branch is global average pooling over space and one linear layer, applied per
time step. Formulas: docs/methods.md, "Shortcut back-propagation and evolutionary training".
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch
from torch import Tensor, nn

from .layers import Head
from .models import SpikingNet

__all__ = ["ShortcutNet", "COMBINES"]

COMBINES = ("logits", "losses")


class ShortcutNet(nn.Module):
    """A registry model plus one classifier branch per attached stage.

    ``attach``: stage names from ``model.stages`` (default: all of them);
    ``combine``: ``"logits"`` (``criterion(main + lam * sum(branches))``) or ``"losses"``
    (``criterion(main) + lam * mean(criterion(branch))``). Branches are created on the
    model's device and dtype; ``state_dict`` keys are ``model.*`` and ``branches.<stage>.*``.
    """

    def __init__(self, model: SpikingNet, attach: Sequence[str] | None = None,
                 combine: str = "logits") -> None:
        super().__init__()
        valid = list(model.stages)
        attach = valid if attach is None else list(attach)
        wrong = [name for name in attach if name not in valid]
        if wrong or not attach or len(set(attach)) != len(attach):
            raise ValueError(f"attach must name distinct stages among {', '.join(valid)} "
                             f"(model.stages); got {attach!r}")
        if combine not in COMBINES:
            raise ValueError(f"combine must be one of {', '.join(COMBINES)}, got {combine!r}")
        self.model = model
        self.attach = attach
        self.combine = combine
        like = next(model.parameters())
        self.branches = nn.ModuleDict({
            name: Head(model.stage_channels[name], model.num_classes).to(like.device, like.dtype)
            for name in attach})

    def forward(self, x: Tensor) -> Tensor | tuple[Tensor, list[Tensor]]:
        """Training: ``(main [T, B, K], [branch [T, B, K] per attached stage])``; eval: main only.

        ``x``: ``[B, C, H, W]`` or ``[T, B, C, H, W]``, as the model takes it.
        """
        if not self.training:
            return self.model(x)
        main, outputs = self.model(x, return_stages=True)
        by_stage = dict(zip(self.model.stages, outputs))
        return main, [self.branches[name](by_stage[name]) for name in self.attach]

    def loss(self, main: Tensor, branches: Sequence[Tensor], target: Tensor, lam: float | Tensor,
             criterion: Callable[[Tensor, Tensor], Tensor]) -> Tensor:
        """The training loss (a scalar) from ``forward``'s outputs and the balance coefficient ``lam``.

        ``criterion(logits [T, B, K], target) -> scalar``, e.g. cross-entropy of the
        time-averaged logits.
        """
        if self.combine == "logits":
            return criterion(main + lam * torch.stack(list(branches)).sum(0), target)
        branch_losses = torch.stack([criterion(b, target) for b in branches])
        return criterion(main, target) + lam * branch_losses.mean()

    def export(self) -> SpikingNet:
        """The plain model without branches (the same object): what inference and checkpoints use."""
        return self.model

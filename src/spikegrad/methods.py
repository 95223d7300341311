"""Training methods as small objects the trainer calls; no ``if method == ...`` in the loop.

A ``Method`` wraps the model for training, turns the wrapped model's output into a
loss, and exports the inference model. The objective (``losses``) decides how
per-step logits ``[T, B, K]`` become a loss and a prediction.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from .losses import RateCE
from .schedules import BalanceSchedule
from .shortcut import ShortcutNet

__all__ = ["Method", "Shortcut", "create"]


class Method:
    """Plain surrogate-gradient training: the model as it is."""

    name = "vanilla"

    def __init__(self, objective: RateCE) -> None:
        self.objective = objective
        self.lam: float | None = None

    def wrap(self, model: nn.Module) -> nn.Module:
        """The module trained (and checkpointed); ``export`` undoes it."""
        return model

    def export(self, trained: nn.Module) -> nn.Module:
        """The inference model: the registry model with nothing added."""
        return trained

    def set_progress(self, epoch: int, epochs: int, step: int, steps_per_epoch: int) -> None:
        """Called before every training step (schedules that move with training)."""

    def loss(self, output: Any, target: Tensor) -> tuple[Tensor, Tensor]:
        """``(loss, main logits [T, B, K])`` from the trained module's output."""
        return self.objective.loss(output, target), output



class Shortcut(Method):
    """Shortcut back-propagation (Guo et al., NeurIPS 2024), λ from a ``BalanceSchedule``:
    constant 1 for plain shortcut training, falling to 0 for evolutionary training."""

    def __init__(self, objective: RateCE, schedule: BalanceSchedule, attach: list | None,
                 combine: str, name: str) -> None:
        super().__init__(objective)
        self.schedule, self.attach, self.combine, self.name = schedule, attach, combine, name
        self.lam = schedule(0, 1)

    def wrap(self, model: nn.Module) -> nn.Module:
        self.net = ShortcutNet(model, attach=self.attach, combine=self.combine)
        return self.net

    def export(self, trained: nn.Module) -> nn.Module:
        return trained.export()

    def set_progress(self, epoch: int, epochs: int, step: int, steps_per_epoch: int) -> None:
        self.lam = self.schedule(epoch, epochs, step, steps_per_epoch)

    def loss(self, output: Any, target: Tensor) -> tuple[Tensor, Tensor]:
        if isinstance(output, torch.Tensor):  # eval mode: main head only
            return self.objective.loss(output, target), output
        main, branches = output
        return self.net.loss(main, branches, target, self.lam, self.objective.loss), main


def create(cfg: Any, objective: RateCE) -> Method:
    """The method of ``cfg.method`` (a ``MethodConfig``)."""
    if cfg.name in ("vanilla", "ann"):
        return Method(objective)
    if cfg.name == "ltl":
        from .tandem import LTL  # tandem imports this module

        return LTL(objective, cfg.teacher, cfg.finetune_epochs, cfg.init_from_teacher)
    if cfg.name == "shortcut":
        schedule = BalanceSchedule("constant", value=cfg.lam)
    elif cfg.name == "evolutionary":
        schedule = BalanceSchedule(cfg.schedule, value=cfg.lam, step_epoch=cfg.step_epoch,
                                   per_step=cfg.per_step)
    else:
        raise ValueError(f"method {cfg.name!r} is not available in this trainer")
    return Shortcut(objective, schedule, cfg.attach, cfg.combine, cfg.name)

"""Training methods as small objects the trainer calls; no ``if method == ...`` in the loop.

A ``Method`` adjusts the model it is given (``model_kwargs``), wraps it for training,
turns the wrapped model's output into a loss, and exports the inference model. The
objective (``losses``) decides how per-step logits ``[T, B, K]`` become a loss and a
prediction. ``METHODS`` maps each ``method.name`` to a class whose ``from_config``
builds it; Local Tandem Learning's lives in ``tandem`` (imported when first asked for).
"""
from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from .losses import RateCE
from .registry import Registry
from .schedules import BalanceSchedule
from .shortcut import ShortcutNet

__all__ = ["Method", "ANN", "Shortcut", "METHODS", "create"]


class Method:
    """Plain surrogate-gradient training: the model as it is."""

    name = "vanilla"

    def __init__(self, objective: RateCE) -> None:
        self.objective = objective
        self.lam: float | None = None

    @classmethod
    def from_config(cls, method_cfg: Any, objective: RateCE) -> "Method":
        """The method of a run's ``method`` section (a ``config.MethodConfig``)."""
        return cls(objective)

    @classmethod
    def model_kwargs(cls, kwargs: dict) -> dict:
        """The ``create_model`` arguments of the model this method trains, from the run's."""
        return kwargs

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


class ANN(Method):
    """The ANN twin trained alone (an LTL teacher): the run's model with the ``clamp``
    activation (ReLU clamped to [0, 2]) in place of every neuron, and ``T = 1``."""

    name = "ann"

    TWIN = {"neuron": {"type": "clamp"}, "T": 1}  # what makes a model its ANN twin

    @classmethod
    def model_kwargs(cls, kwargs: dict) -> dict:
        return {**kwargs, **cls.TWIN}


class Shortcut(Method):
    """Shortcut back-propagation (Guo et al., NeurIPS 2024), λ from a ``BalanceSchedule``:
    constant 1 for plain shortcut training, falling to 0 for evolutionary training."""

    def __init__(self, objective: RateCE, schedule: BalanceSchedule, attach: list | None,
                 combine: str, name: str) -> None:
        super().__init__(objective)
        self.schedule, self.attach, self.combine, self.name = schedule, attach, combine, name
        self.lam = schedule(0, 1)

    @classmethod
    def from_config(cls, method_cfg: Any, objective: RateCE) -> "Shortcut":
        """``shortcut``: λ constant at ``lam``; ``evolutionary``: λ on ``schedule``."""
        if method_cfg.name == "shortcut":
            schedule = BalanceSchedule("constant", value=method_cfg.lam)
        else:
            schedule = BalanceSchedule(method_cfg.schedule, value=method_cfg.lam,
                                       step_epoch=method_cfg.step_epoch, per_step=method_cfg.per_step)
        return cls(objective, schedule, method_cfg.attach, method_cfg.combine, method_cfg.name)

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


METHODS: Registry[type[Method]] = Registry("method")
METHODS.register("vanilla", Method)
METHODS.register("ann", ANN)
METHODS.register("shortcut", Shortcut)
METHODS.register("evolutionary", Shortcut)
METHODS.register("ltl", "spikegrad.tandem:LTL")  # tandem imports this module


def create(method_cfg: Any, objective: RateCE) -> Method:
    """The method of ``method_cfg`` (a ``MethodConfig``; ``method_cfg.name`` in ``METHODS``)."""
    return METHODS.get(method_cfg.name).from_config(method_cfg, objective)

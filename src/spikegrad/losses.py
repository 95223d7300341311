"""Losses over per-step logits ``[T, B, K]`` and how they decode to a prediction.

Each objective has ``loss(logits, target)`` (a scalar) and ``decode(logits)``
(``[B, K]`` scores used for accuracy), and two training hooks the trainer calls for every
objective (``observe`` after each step, ``end_epoch`` after each epoch; no-ops but for
TWO). ``create(name, T, **kw)`` builds one by its name in ``LOSSES``; ``from_config``
from a run's ``loss`` section.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from .registry import Registry

__all__ = ["RateCE", "TET", "TWO", "LOSSES", "create", "from_config"]


class RateCE:
    """Rate-coded cross-entropy: ``CE(mean_t logits, y)``."""

    name = "ce"  # the ``create`` name, stored with exported models
    takes_T = False  # whether ``__init__`` takes the number of steps first

    def decode(self, logits: Tensor) -> Tensor:
        """``[T, B, K] -> [B, K]``: the mean over time."""
        return logits.mean(0)

    def loss(self, logits: Tensor, target: Tensor) -> Tensor:
        """``logits: [T, B, K]``, ``target: [B]`` -> scalar."""
        return F.cross_entropy(self.decode(logits), target)

    def observe(self, logits: Tensor, target: Tensor) -> None:
        """After a training step: its detached logits ``[T, B, K]`` and targets ``[B]``."""

    def end_epoch(self, epoch: int) -> None:
        """After training epoch ``epoch`` (0-based), before its evaluation."""

    def state_dict(self) -> dict:
        """Decoding state for checkpoints (none for a plain mean)."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        """Restore ``state_dict()``."""

    @classmethod
    def from_config(cls, loss_cfg: Any, T: int) -> "RateCE":
        """The objective of a run's ``loss`` section (a ``config.LossConfig``) at ``T`` steps."""
        return cls()


class TET(RateCE):
    """Temporal efficient training (Deng et al., ICLR 2022):
    ``(1 - lam) * mean_t CE(o_t, y) + lam * MSE(o, phi)``, the MSE over every step's
    logits against the constant ``phi`` (``lam = 0``: the cross-entropy term alone).
    Decodes by the mean over time."""

    name = "tet"

    def __init__(self, lam: float = 0.0, phi: float = 1.0) -> None:
        self.lam, self.phi = lam, phi

    def loss(self, logits: Tensor, target: Tensor) -> Tensor:
        T = logits.shape[0]
        ce = F.cross_entropy(logits.flatten(0, 1), target.repeat(T))
        if self.lam == 0:
            return ce
        mse = F.mse_loss(logits, torch.full_like(logits, self.phi))
        return (1 - self.lam) * ce + self.lam * mse

    @classmethod
    def from_config(cls, loss_cfg: Any, T: int) -> "TET":
        return cls(lam=loss_cfg.lam, phi=loss_cfg.phi)


class TWO(RateCE):
    """Temporally weighted output (MSG paper).

    ``variant="official"`` (the authors' code): ``decode = mean_t(a_t o_t)``; ``a = 1``
    for the first ``warmup`` epochs, then after each epoch
    ``a <- (1 - alpha) a + alpha acc_t / mean_t(acc_t)``. ``variant="paper"`` (the
    paper's text): ``decode = sum_t(a_t o_t)``; ``a`` starts at ``1/T`` (so the first
    epochs decode by the mean) and is low-pass filtered towards ``acc_t`` with
    ``alpha`` after each epoch from the ``warmup``-th on.
    ``acc_t`` is the training accuracy of step t's output alone over the last epoch,
    collected with ``observe`` and applied with ``end_epoch``. The weights are decoding
    state (``state_dict``), saved in checkpoints and exported models, not model weights.
    """

    name = "two"
    takes_T = True

    def __init__(self, T: int, alpha: float = 0.3, warmup: int = 5,
                 variant: str = "official") -> None:
        if variant not in ("official", "paper"):
            raise ValueError(f"TWO variant must be 'official' or 'paper', got {variant!r}")
        self.alpha, self.warmup, self.variant = alpha, warmup, variant
        self.weights = torch.ones(T) if variant == "official" else torch.full((T,), 1.0 / T)
        self._correct = torch.zeros(T)
        self._seen = 0

    def decode(self, logits: Tensor) -> Tensor:
        """``[T, B, K] -> [B, K]``: ``mean_t(a_t o_t)`` (official) or ``sum_t(a_t o_t)`` (paper)."""
        a = self.weights.to(logits.device, logits.dtype).view(-1, 1, 1)
        weighted = a * logits
        return weighted.sum(0) if self.variant == "paper" else weighted.mean(0)

    @torch.no_grad()
    def observe(self, logits: Tensor, target: Tensor) -> None:
        """Count each step's correct predictions on a training batch (``[T, B, K]``, ``[B]``)."""
        self._correct += (logits.argmax(-1) == target).sum(1).cpu().float()
        self._seen += target.numel()

    def end_epoch(self, epoch: int) -> None:
        """Update the weights from the epoch's per-step accuracies (0-based ``epoch``)."""
        if self._seen and epoch + 1 >= self.warmup:
            acc = self._correct / self._seen
            if self.variant == "official":
                target = acc / acc.mean().clamp(min=1e-12)
            else:
                target = acc
            self.weights = (1 - self.alpha) * self.weights + self.alpha * target
        self._correct.zero_()
        self._seen = 0

    def state_dict(self) -> dict:
        return {"weights": self.weights.clone(), "correct": self._correct.clone(), "seen": self._seen}

    def load_state_dict(self, state: dict) -> None:
        self.weights = state["weights"].clone().float()
        self._correct = state.get("correct", torch.zeros_like(self.weights)).clone().float()
        self._seen = int(state.get("seen", 0))

    @classmethod
    def from_config(cls, loss_cfg: Any, T: int) -> "TWO":
        return cls(T, alpha=loss_cfg.alpha, warmup=loss_cfg.warmup, variant=loss_cfg.variant)


LOSSES: Registry[type[RateCE]] = Registry("loss")
LOSSES.register("ce", RateCE)
LOSSES.register("tet", TET)
LOSSES.register("two", TWO)


def create(name: str, T: int, **kwargs: Any) -> RateCE:
    """A registered objective (``LOSSES``: ``ce``, ``tet``, ``two``) with its keyword arguments."""
    cls = LOSSES.get(name)
    try:
        return cls(T, **kwargs) if cls.takes_T else cls(**kwargs)
    except TypeError as err:
        raise ValueError(f"loss {name!r}: {err}") from None


def from_config(loss_cfg: Any, T: int) -> RateCE:
    """The objective of a run's ``loss`` section (``loss_cfg.name`` in ``LOSSES``)."""
    return LOSSES.get(loss_cfg.name).from_config(loss_cfg, T)

"""Losses over per-step logits ``[T, B, K]`` and how they decode to a prediction.

Each objective has ``loss(logits, target)`` (a scalar) and ``decode(logits)``
(``[B, K]`` scores used for accuracy). ``create(name, T, **kw)`` builds one.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["RateCE", "TET", "TWO", "create", "NAMES"]

NAMES = ("ce", "tet", "two")


class RateCE:
    """Rate-coded cross-entropy: ``CE(mean_t logits, y)``."""

    name = "ce"  # the ``create`` name, stored with exported models

    def decode(self, logits: Tensor) -> Tensor:
        """``[T, B, K] -> [B, K]``: the mean over time."""
        return logits.mean(0)

    def loss(self, logits: Tensor, target: Tensor) -> Tensor:
        """``logits: [T, B, K]``, ``target: [B]`` -> scalar."""
        return F.cross_entropy(self.decode(logits), target)

    def state_dict(self) -> dict:
        """Decoding state for checkpoints (none for a plain mean)."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        """Restore ``state_dict()``."""


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


def create(name: str, T: int, **kwargs: Any) -> RateCE:
    """``ce`` | ``tet`` | ``two`` with their keyword arguments."""
    if name == "ce":
        if kwargs:
            raise ValueError(f"loss 'ce' takes no arguments, got {sorted(kwargs)}")
        return RateCE()
    if name == "tet":
        return TET(**kwargs)
    if name == "two":
        return TWO(T, **kwargs)
    raise ValueError(f"unknown loss {name!r}; expected one of {', '.join(NAMES)}")

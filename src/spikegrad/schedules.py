"""Schedules over training: the shortcut balance coefficient λ, Dspike's temperature,
and AdaLi's shrinking boundaries (docs/methods.md).

Each is a small object the trainer calls at the start of every epoch; none keeps
state that is not a pure function of the epoch except ``DspikeTemperature`` (its
current ``b``), which ``state_dict`` exposes for checkpoints.
"""
from __future__ import annotations

import contextlib
import math
from typing import Callable, Iterator

import torch
from torch import Tensor, nn

from . import surrogate as sg

__all__ = ["progress", "probing", "BalanceSchedule", "DspikeTemperature", "AdaLiSchedule", "adali_bound"]

BALANCE_KINDS = ("constant", "linear", "cosine", "step")
ADALI_KINDS = ("log", "linear", "sqrt", "linear-geometric", "sqrt-geometric")


def progress(index: int, count: int) -> float:
    """``index / (count - 1)`` in [0, 1]; 1 when there is a single epoch or step."""
    return 1.0 if count <= 1 else min(max(index / (count - 1), 0.0), 1.0)


class BalanceSchedule:
    """λ of shortcut training: constant (shortcut alone) or falling 1 -> 0 (evolutionary).

    ``linear``: 1 - p; ``cosine``: (1 + cos πp)/2; ``step``: 1 before ``step_epoch``, then 0;
    ``constant``: ``value`` always. ``p`` is epoch progress ``e/(E-1)``, or step progress
    ``s/(S-1)`` over all training steps when ``per_step``.
    """

    def __init__(self, kind: str = "linear", value: float = 1.0, step_epoch: int | None = None,
                 per_step: bool = False) -> None:
        if kind not in BALANCE_KINDS:
            raise ValueError(f"balance schedule must be one of {', '.join(BALANCE_KINDS)}, got {kind!r}")
        if kind == "step" and step_epoch is None:
            raise ValueError("balance schedule 'step' needs step_epoch (the epoch λ drops to 0)")
        self.kind, self.value, self.step_epoch, self.per_step = kind, value, step_epoch, per_step

    def __call__(self, epoch: int, epochs: int, step: int = 0, steps_per_epoch: int = 1) -> float:
        """λ at ``epoch`` (0-based) of ``epochs``, and at ``step`` of the epoch when per_step."""
        if self.kind == "constant":
            return self.value
        if self.kind == "step":
            return 1.0 if epoch < self.step_epoch else 0.0
        if self.per_step:
            p = progress(epoch * steps_per_epoch + step, epochs * steps_per_epoch)
        else:
            p = progress(epoch, epochs)
        return 1.0 - p if self.kind == "linear" else (1.0 + math.cos(math.pi * p)) / 2


def adali_bound(epoch: int, epochs: int, high: float, low: float, kind: str = "log") -> float:
    """An AdaLi boundary at ``epoch`` (0-based) of ``epochs``, from ``high`` (first epoch)
    towards ``low``. With ``e`` the epoch and ``E`` the epochs:

    - ``log``: ``high * (low/high)^(ln(e+1)/ln E)``, reaching ``low`` at the last epoch;
    - ``linear``: ``high + (low - high) * e/(E-1)``, reaching ``low`` at the last epoch;
    - ``sqrt``: ``high + (low - high) * (sqrt(e+1) - 1)/sqrt(E-1)``, which ends short of
      ``low`` (at ``(sqrt(E) - 1)/sqrt(E-1)`` of the way: 0.956 for E = 500);
    - ``linear-geometric`` / ``sqrt-geometric``: ``high * (low/high)^f`` with
      ``f = e/(E-1)`` / ``sqrt(e/(E-1))`` (spikegrad's earlier forms, kept as options).

    ``log``, ``linear`` and ``sqrt`` are the AdaLi authors' code (its 1-based epoch is
    ``e + 1`` here). With ``E = 1`` the boundary stays at ``high``.
    """
    if kind not in ADALI_KINDS:
        raise ValueError(f"AdaLi schedule must be one of {', '.join(ADALI_KINDS)}, got {kind!r}")
    if epochs <= 1:
        return high
    e = min(max(epoch, 0), epochs - 1)
    if kind == "linear":
        return high + (low - high) * e / (epochs - 1)
    if kind == "sqrt":
        return high + (low - high) * (math.sqrt(e + 1) - 1) / math.sqrt(epochs - 1)
    f = {"log": math.log(e + 1) / math.log(epochs), "linear-geometric": progress(e, epochs),
         "sqrt-geometric": math.sqrt(progress(e, epochs))}[kind]
    return high * (low / high) ** f


class AdaLiSchedule:
    """Shrinks every AdaLi surrogate's (L, R) from (L_max, R_max) to (L_min, R_min)."""

    def __init__(self, kind: str = "log") -> None:
        adali_bound(0, 2, 1.0, 1.0, kind)  # validates kind
        self.kind = kind

    def __call__(self, surrogate: sg.AdaLi, epoch: int, epochs: int) -> tuple[float, float]:
        """Set and return the boundaries for ``epoch``."""
        L = adali_bound(epoch, epochs, surrogate.L_max, surrogate.L_min, self.kind)
        R = adali_bound(epoch, epochs, surrogate.R_max, surrogate.R_min, self.kind)
        surrogate.set_bounds(L, R)
        return L, R


@contextlib.contextmanager
def probing(model: nn.Module, train: bool) -> Iterator[nn.Module]:
    """Run ``model`` in training (``train``) or eval mode inside the block, then give it back
    as it was: its mode and every buffer (BN running statistics and counts) restored."""
    was_training = model.training
    buffers = [(b, b.clone()) for b in model.buffers()]
    model.train(train)
    try:
        yield model
    finally:
        with torch.no_grad():
            for b, saved in buffers:
                b.copy_(saved)
        model.train(was_training)


class DspikeTemperature:
    """Dspike's temperature search (docs/methods.md, "Dspike temperature search"): keep the
    ``b`` among ``b, b - Δb, b + Δb`` whose first-layer weight gradient best matches
    (cosine) a finite-difference estimate of the true one.

    The finite-difference gradient is estimated along ``directions`` random unit
    directions with central differences of step ``eps`` (``relative_eps``: ``eps`` times
    the weight's norm, so the step moves spikes whatever the layer's scale), 2K forward
    passes; the surrogate gradients are compared in the same K-dimensional projection.
    ``train_mode``: the estimate runs the model in training mode (batch statistics in
    every batch norm, as in a training step; the running statistics are restored after),
    otherwise in eval mode. ``b`` stays unless the estimate is informative and agrees
    with itself: when no difference moves the loss (no spike flipped), when every
    candidate's cosine is <= 0 (the estimate is anti-correlated with all of them), or when
    the two halves of the directions pick different winners, ``b`` is kept; ties keep it
    too. ``last_cosines``
    (of ``b - Δb, b, b + Δb``) and ``last_zero`` (differences that were exactly 0)
    describe the last search.
    """

    def __init__(self, b0: float, delta: float, eps: float, directions: int, seed: int = 0, *,
                 relative_eps: bool = False, train_mode: bool = False) -> None:
        self.b, self.delta, self.eps, self.directions, self.seed = b0, delta, eps, directions, seed
        self.relative_eps, self.train_mode = relative_eps, train_mode
        self.last_cosines: list[float] = []
        self.last_zero = 0

    def state_dict(self) -> dict:
        """The current temperature (everything else is configuration)."""
        return {"b": self.b}

    def load_state_dict(self, state: dict) -> None:
        """Restore ``state_dict()``."""
        self.b = float(state["b"])

    @torch.no_grad()
    def _directional_derivatives(self, loss: Callable[[], Tensor], weight: nn.Parameter, dirs: Tensor,
                                 step: float) -> Tensor:
        out = []
        for u in dirs:
            weight += step * u
            up = loss()
            weight -= 2 * step * u
            down = loss()
            weight += step * u
            out.append((up - down) / (2 * step))
        return torch.stack(out)

    def step(self, model: nn.Module, weight: nn.Parameter, surrogates: list[sg.Dspike],
             loss: Callable[[], Tensor], epoch: int) -> float:
        """Choose and set the temperature on every Dspike in ``surrogates``; returns it.

        ``loss()`` evaluates the training loss of ``model`` on one fixed batch. The model's
        mode and buffers are as before afterwards.
        """
        with probing(model, train=self.train_mode):
            best = round(self._search(weight, surrogates, loss, epoch), 9)  # b0 + k delta, no float drift
        for s in surrogates:
            s.b = best
        self.b = best
        return best

    def _search(self, weight: nn.Parameter, surrogates: list[sg.Dspike], loss: Callable[[], Tensor],
                epoch: int) -> float:
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        dirs = torch.randn((self.directions, *weight.shape), generator=gen).to(weight)
        dirs /= dirs.flatten(1).norm(dim=1).view(-1, *([1] * weight.dim()))
        step = self.eps * float(weight.detach().norm()) if self.relative_eps else self.eps
        numeric = self._directional_derivatives(loss, weight, dirs, step)
        self.last_zero = int((numeric == 0).sum())
        candidates = [b for b in (self.b, self.b - self.delta, self.b + self.delta) if b > 0]
        projected = {}  # each candidate's surrogate gradient along the directions
        for b in candidates:
            for s in surrogates:
                s.b = b
            (grad,) = torch.autograd.grad(loss(), weight)
            projected[b] = dirs.flatten(1).to(numeric.dtype) @ grad.flatten().to(numeric.dtype)

        def cosine(b: float, part: slice = slice(None)) -> float:
            return float(torch.nn.functional.cosine_similarity(projected[b][part], numeric[part], dim=0))

        def winner(part: slice) -> float:  # the first (current b) wins ties
            return max(candidates, key=lambda b: cosine(b, part))

        self.last_cosines = [cosine(b) if b in projected else float("nan")
                             for b in (self.b - self.delta, self.b, self.b + self.delta)]
        if self.last_zero == len(numeric) or max(cosine(b) for b in candidates) <= 0:
            return self.b  # no information, or anti-correlated with every candidate
        half = len(numeric) // 2
        best = winner(slice(None))
        agree = winner(slice(0, half)) == best == winner(slice(half, None))
        return best if agree else self.b

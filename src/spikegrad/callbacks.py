"""Training callbacks: the pieces of a method that move with training and keep state.

The trainer knows no surrogate, objective or method by type: at the start of a run it
asks every factory in ``CALLBACKS`` for a callback (a factory returns None when its
method is not in the run), then calls each at fixed points and saves each one's
``state_dict`` in the run checkpoint under its name:

- ``start_epoch(trainer, epoch)`` before the epoch's first step (returns what to log);
- ``end_step(trainer, logits, target)`` after every optimiser step;
- ``end_epoch(trainer, epoch)`` after the epoch's last step, before evaluation.

Registered here: Dspike's temperature search, AdaLi's calibration and boundary
schedule, MSG's mask generators and the objective's own updates (TWO's weights). A
user adds one with ``CALLBACKS.register("name", factory)``, ``factory(trainer)``.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable

import torch
from torch import Tensor, nn

from . import monitor
from . import surrogate as sg
from .neuron import BaseNeuron
from .registry import Registry
from .schedules import AdaLiSchedule, DspikeTemperature, probing

if TYPE_CHECKING:
    from .train import Trainer

__all__ = ["Callback", "CALLBACKS", "surrogates_of", "DspikeSearch", "AdaLiTraining", "MSGMasks",
           "ObjectiveUpdates", "create_all"]


class Callback:
    """A no-op callback; subclasses override what they need."""

    def start_epoch(self, trainer: "Trainer", epoch: int) -> dict:
        """Before the first step of ``epoch`` (0-based; also on a resumed run's first epoch
        when it resumes at its first batch); returns values to log with the epoch."""
        return {}

    def end_step(self, trainer: "Trainer", logits: Tensor, target: Tensor) -> None:
        """After an optimiser step: its detached float logits ``[T, B, K]`` and targets ``[B]``."""

    def end_epoch(self, trainer: "Trainer", epoch: int) -> None:
        """After the last step of ``epoch``, before its evaluation."""

    def state_dict(self) -> dict:
        """What a bit-exact resume needs (``weights_only``-loadable data)."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        """Restore ``state_dict()``."""


CALLBACKS: Registry[Callable[["Trainer"], Callback | None]] = Registry("callback")


def create_all(trainer: "Trainer") -> dict[str, Callback]:
    """``{name: callback}`` of every registered factory that applies to ``trainer``'s run."""
    made = {name: CALLBACKS.get(name)(trainer) for name in CALLBACKS.names()}
    return {name: cb for name, cb in made.items() if cb is not None}


def surrogates_of(model: nn.Module, kind: type) -> list:
    """The surrogates of ``kind`` in ``model`` (submodules, so MSG's ``base`` too), each once."""
    return [m for m in model.modules() if isinstance(m, kind)]


class DspikeSearch(Callback):
    """Dspike's temperature search (``schedules.DspikeTemperature``) at the start of every
    epoch but the first (the first trains at the starting ``b``, the surrogates' own: a
    search needs weights that have learned something), on one fixed training batch with
    the first weight layer, in training mode by default (``surrogate_schedule.train_mode``);
    every Dspike then gets the chosen ``b``."""

    def __init__(self, surrogates: list[sg.Dspike], search: DspikeTemperature) -> None:
        self.surrogates, self.search = surrogates, search

    def start_epoch(self, trainer: "Trainer", epoch: int) -> dict:
        if epoch > 0 and trainer.batch == 0:
            x, y = trainer.fixed_batch()
            weight = dict(trainer.model.named_modules())[monitor.layer_names(trainer.model)[0]].weight
            self.search.step(trainer.net, weight, self.surrogates,
                             lambda: trainer.method.loss(trainer.net(x), y)[0], epoch)
        for s in self.surrogates:
            s.b = self.search.b
        return {"dspike_b": self.search.b}

    def state_dict(self) -> dict:
        return self.search.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.search.load_state_dict(state)


def _dspike(trainer: "Trainer") -> DspikeSearch | None:
    found = surrogates_of(trainer.model, sg.Dspike)
    sched = trainer.cfg.surrogate_schedule
    if not found or sched.name == "none":
        return None
    search = DspikeTemperature(found[0].b, sched.delta, sched.eps, sched.directions, trainer.cfg.seed,
                               relative_eps=sched.relative_eps, train_mode=sched.train_mode)
    return DspikeSearch(found, search)


class AdaLiTraining(Callback):
    """AdaLi's boundaries, shrunk every epoch by an ``AdaLiSchedule``; with ``calibrate``,
    first fitted (``AdaLi.calibrate``) to the first-step potentials of every neuron on one
    training batch, the model in training mode as in a training step (batch statistics
    in every batch norm, whose running statistics are left as they were)."""

    def __init__(self, surrogates: list[sg.AdaLi], schedule: AdaLiSchedule, calibrate: bool) -> None:
        self.surrogates, self.schedule, self.calibrate = surrogates, schedule, calibrate

    def start_epoch(self, trainer: "Trainer", epoch: int) -> dict:
        if self.calibrate and epoch == 0 and trainer.batch == 0:
            potentials = training_potentials(trainer.model, trainer.fixed_batch()[0])
            for s in self.surrogates:
                s.calibrate(potentials)
        logged: dict = {}
        for s in self.surrogates:
            logged["adali_L"], logged["adali_R"] = self.schedule(s, epoch, trainer.cfg.epochs)
        return logged

    def state_dict(self) -> dict:
        return {"surrogates": [s.config() for s in self.surrogates]}

    def load_state_dict(self, state: dict) -> None:
        for s, saved in zip(self.surrogates, state["surrogates"]):
            s.alpha, s.beta, s.L_max, s.R_max = saved["alpha"], saved["beta"], saved["L"], saved["R"]


@torch.no_grad()
def training_potentials(model: nn.Module, x: Tensor) -> Tensor:
    """Every neuron's first-step potential minus its threshold on ``x`` (its input at t = 0,
    normalised when the neuron folds a batch norm: the membrane before any spike or leak;
    flattened, float32 on CPU), from a forward in training mode; the model's buffers (BN
    running statistics and counts) and mode are restored afterwards."""
    seen: list[Tensor] = []
    hooks = [m.register_forward_hook(
                 lambda mod, args, kwargs, out: seen.append(mod.input_of(args, kwargs)[0] - mod.v_threshold),
                 with_kwargs=True)
             for m in model.modules() if isinstance(m, BaseNeuron)]
    try:
        with probing(model, train=True):
            model(x)
    finally:
        for h in hooks:
            h.remove()
    return torch.cat([p.flatten().float().cpu() for p in seen])


def _adali(trainer: "Trainer") -> AdaLiTraining | None:
    found = surrogates_of(trainer.model, sg.AdaLi)
    sched = trainer.cfg.surrogate_schedule
    if not found or sched.name == "none":
        return None
    return AdaLiTraining(found, AdaLiSchedule(sched.kind), sched.calibrate)


class MSGMasks(Callback):
    """MSG's mask generators: their states are saved, so a resumed run draws the same masks."""

    def __init__(self, surrogates: list[sg.MSG]) -> None:
        self.surrogates = surrogates

    def state_dict(self) -> dict:
        return {"generators": [s.get_rng_state() for s in self.surrogates]}

    def load_state_dict(self, state: dict) -> None:
        for s, gen_state in zip(self.surrogates, state["generators"]):
            s.set_rng_state(gen_state)


def _msg(trainer: "Trainer") -> MSGMasks | None:
    found = surrogates_of(trainer.model, sg.MSG)
    return MSGMasks(found) if found else None


class ObjectiveUpdates(Callback):
    """The objective's own training hooks (``observe`` each step, ``end_epoch`` each epoch:
    TWO's temporal weights); its state is the objective's decoding state."""

    def __init__(self, objective: Any) -> None:
        self.objective = objective

    def end_step(self, trainer: "Trainer", logits: Tensor, target: Tensor) -> None:
        self.objective.observe(logits, target)

    def end_epoch(self, trainer: "Trainer", epoch: int) -> None:
        self.objective.end_epoch(epoch)

    def state_dict(self) -> dict:
        return self.objective.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.objective.load_state_dict(state)


CALLBACKS.register("dspike", _dspike)
CALLBACKS.register("adali", _adali)
CALLBACKS.register("msg", _msg)
CALLBACKS.register("objective", lambda trainer: ObjectiveUpdates(trainer.objective))

"""Local Tandem Learning (Yang et al., NeurIPS 2022): an ANN teacher, layer-wise local losses.

    >>> teacher = ann_twin(student)                      # the same net, clamp activation, T=1
    >>> net = TandemNet(student, teacher)                # or a checkpoint path: loaded on first use
    >>> logits, local = net(x)                           # training: [T, B, K], {layer: loss}
    >>> loss = rate_ce(logits, y) + sum(local.values())
    >>> plain = net.export()                             # the student alone, for inference

Every student neuron layer ``l`` (``layers.neuron_layers``) is matched to the teacher's
activation at the same place and gets ``MSE(r_l, A_norm_l)``, with the firing rate
``r_l = mean_t s_l[t]`` and ``A_norm_l = clamp(A_l / P99.9(A_l), 0, 1)`` (the 99.9th
percentile of the batch). Each neuron's output is passed on detached, so every layer's
input is detached: a hidden layer learns only from its own local loss (gradient still
flows through time inside the layer), in residual blocks the shortcut path too, and
only the output layer sees the cross-entropy. Formulas: docs/methods.md, "Local Tandem Learning".
"""
from __future__ import annotations

import math
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator, NamedTuple

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from .checkpoint import CheckpointError, load_inference_model
from .layers import neuron_layers
from .losses import RateCE
from .methods import ANN, Method
from .models import SpikingNet, create_model

__all__ = ["ann_twin", "load_teacher", "check_teacher", "freeze", "percentile",
           "normalise_target",
           "TandemOutput", "TandemNet", "LTL", "PERCENTILE"]

PERCENTILE = 0.999


def ann_twin(model: SpikingNet | str, **kwargs: Any) -> SpikingNet:
    """The teacher of ``model``: the same registry model with the ``clamp`` activation
    (ReLU clamped to [0, 2]) in place of every neuron, and ``T=1``.

    ``model`` is a ``SpikingNet`` (its ``config`` is reused, ``kwargs`` override it) or a
    registry name (``kwargs`` are the other ``create_model`` arguments). What a
    ``method=ann`` run trains. Returns logits ``[1, B, num_classes]``.
    """
    config = {"name": model, **kwargs} if isinstance(model, str) else {**model.config, **kwargs}
    return create_model(**{**config, **ANN.TWIN})


def _shape(t: Tensor) -> str:
    return "[" + ",".join(str(n) for n in t.shape) + "]"


def _layer_tensors(model: nn.Module) -> dict[str, Tensor]:
    """``state_dict`` entries of ``model`` outside its neuron layers (PLIF's tau is the student's own)."""
    neurons = tuple(f"{name}." for name, _ in neuron_layers(model))
    return {k: v for k, v in model.state_dict().items() if not k.startswith(neurons)}


def _first_mismatch(teacher: nn.Module, student: nn.Module) -> str | None:
    """A sentence naming the first layer whose presence or shape differs, or None."""
    have, want = _layer_tensors(teacher), _layer_tensors(student)
    for key, tensor in want.items():
        if key not in have:
            return f"the teacher has no layer {key!r} (student expects {_shape(tensor)})"
        if have[key].shape != tensor.shape:
            return f"teacher layer {key!r} has shape {_shape(have[key])}, student expects {_shape(tensor)}"
    extra = [key for key in have if key not in want]
    return f"teacher layer {extra[0]!r} has no counterpart in the student" if extra else None


def check_teacher(teacher: SpikingNet, student: SpikingNet, source: str = "teacher") -> None:
    """Raise one ``ValueError`` unless ``teacher`` has ``student``'s model name and layer shapes."""
    names = teacher.config["name"], student.config["name"]
    mismatch = _first_mismatch(teacher, student)
    if mismatch is None and names[0] == names[1]:
        return
    detail = mismatch or "the model names differ"
    raise ValueError(f"{source} ({names[0]}) does not match the student ({names[1]}): {detail}")


def load_teacher(path: str | Path, student: SpikingNet) -> SpikingNet:
    """The frozen teacher (eval mode, no gradients, on ``student``'s device) from ``path``:
    a run checkpoint (``best.pt``/``last.pt`` of a ``method=ann`` run) or an exported
    model file, loaded by ``checkpoint.load_inference_model``. A teacher of another
    architecture raises one ``ValueError`` naming the first mismatching layer."""
    try:
        teacher, _, _ = load_inference_model(path)
    except CheckpointError as err:
        raise CheckpointError(f"teacher {err}") from None
    check_teacher(teacher, student, f"teacher {str(path)!r}")
    return freeze(teacher.to(next(student.parameters()).device))


def freeze(model: nn.Module) -> nn.Module:
    """``model`` in eval mode with every parameter's ``requires_grad`` off (in place)."""
    for p in model.parameters():
        p.requires_grad_(False)
    return model.eval()


def percentile(a: Tensor, q: float) -> Tensor:
    """The ``q``-quantile (``0 <= q <= 1``) of all elements of ``a``, as ``torch.quantile``
    computes it (linear interpolation between order statistics), without its size limit.
    Returns a float32 scalar."""
    flat = a.detach().flatten().float()
    pos = q * (flat.numel() - 1)
    below = math.floor(pos)
    top = flat.topk(flat.numel() - below).values  # descending; ends at the (below+1)-th smallest
    low, high = top[-1], top[-2] if top.numel() > 1 else top[-1]
    return low + (pos - below) * (high - low)


def normalise_target(activation: Tensor, q: float = PERCENTILE) -> Tensor:
    """The teacher target ``clamp(A / P_q(A), 0, 1)`` of an activation ``[B, ...]`` (same shape).

    ``P_q`` is the ``q``-quantile over the whole batch (the paper's). Where ``P_q = 0`` (a
    nearly silent layer) the target is 0, except the rare positive activations, which
    saturate at 1. (A per-channel quantile was measured and did not help: docs/results.md.)
    """
    scale = percentile(activation, q)
    return (activation.float() / scale.clamp_min(torch.finfo(torch.float32).tiny)).clamp(0.0, 1.0)


class TandemOutput(NamedTuple):
    """A training forward of ``TandemNet``: ``logits [T, B, K]`` and ``local``, one scalar
    loss ``MSE(r_l, A_norm_l)`` per student neuron layer name, in forward order."""

    logits: Tensor
    local: dict[str, Tensor]


@contextmanager
def _forward_hooks(layers: list[tuple[str, nn.Module]], hook: Callable[[str, Tensor], Tensor | None]
                   ) -> Iterator[None]:
    """Forward hooks ``hook(name, output)`` on ``layers`` while the block runs, removed after."""
    handles = [m.register_forward_hook(lambda mod, args, out, name=name: hook(name, out))
               for name, m in layers]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


class TandemNet(nn.Module):
    """A student ``SpikingNet`` trained against a frozen teacher (its ANN twin).

    ``teacher``: a model (checked with ``check_teacher`` and frozen) or a checkpoint path,
    loaded with ``load_teacher`` on the first training forward, so that restoring a
    trained run never needs the teacher file. The teacher is not a submodule: the
    ``state_dict`` holds ``student.*`` only, and ``train()``/``to()`` leave it alone.
    ``local``: compute the local losses (True) or train end to end (False, fine-tuning).
    ``q``: the targets' normalising quantile (``normalise_target``).
    """

    def __init__(self, student: SpikingNet, teacher: nn.Module | str | Path, local: bool = True,
                 q: float = PERCENTILE) -> None:
        super().__init__()
        self.student = student
        self.local = local
        self.q = q
        self.neurons = neuron_layers(student)
        if isinstance(teacher, nn.Module):
            check_teacher(teacher, student)
            teacher = freeze(teacher)
        object.__setattr__(self, "_teacher", teacher)  # kept out of the module tree

    @property
    def teacher(self) -> nn.Module:
        """The frozen teacher, on the student's device (loaded from its path on first use)."""
        if not isinstance(self._teacher, nn.Module):
            object.__setattr__(self, "_teacher", load_teacher(self._teacher, self.student))
        return self._teacher.to(next(self.student.parameters()).device)

    @torch.no_grad()
    def init_from_teacher(self) -> None:
        """Start the student from the teacher's weights and BN statistics (same keys and
        shapes, see ``check_teacher``; a neuron's own parameters, e.g. PLIF's, keep theirs)."""
        self.student.load_state_dict(self.teacher.state_dict(), strict=False)

    @torch.no_grad()
    def targets(self, x: Tensor) -> dict[str, Tensor]:
        """``{neuron layer name: A_norm [B, ...]}``: the teacher's activations on ``x`` (averaged
        over its time steps, one for an ANN twin), normalised by ``normalise_target``."""
        teacher = self.teacher
        seen: dict[str, Tensor] = {}
        with _forward_hooks(neuron_layers(teacher), lambda name, out: seen.__setitem__(name, out)):
            teacher(x)
        return {name: normalise_target(a.mean(0), self.q) for name, a in seen.items()}

    def tandem(self, x: Tensor) -> TandemOutput:
        """The student on ``x`` with every neuron's output passed on detached, and each neuron
        layer's local loss ``MSE(mean_t s[t], A_norm)`` against ``targets(x)``."""
        targets = self.targets(x)
        local: dict[str, Tensor] = {}

        def hook(name: str, spikes: Tensor) -> Tensor:
            local[name] = F.mse_loss(spikes.mean(0).float(), targets[name])
            return spikes.detach()

        with _forward_hooks(self.neurons, hook):
            logits = self.student(x)
        return TandemOutput(logits, local)

    def forward(self, x: Tensor) -> TandemOutput | Tensor:
        """Training with ``local``: ``tandem(x)``; otherwise (evaluation, fine-tuning) the
        student's logits ``[T, B, K]``. ``x``: ``[B, C, H, W]`` or ``[T, B, C, H, W]``."""
        return self.tandem(x) if self.training and self.local else self.student(x)

    @torch.no_grad()
    def local_losses(self, x: Tensor) -> dict[str, float]:
        """``{neuron layer name: local loss}`` on ``x``, measured without gradients in the
        student's current mode (a diagnostic: how close each layer is to its target)."""
        return {name: float(v) for name, v in self.tandem(x).local.items()}

    def export(self) -> SpikingNet:
        """The plain student (the same object): what inference and exported files use."""
        return self.student


class LTL(Method):
    """Local Tandem Learning as a trainer ``Method``: ``wrap`` builds a ``TandemNet``; the
    loss is ``objective(logits) + sum_l local_l`` (any objective: rate CE, TET, TWO); the
    last ``finetune_epochs`` epochs train end to end with the objective alone. With
    ``init_from_teacher`` the student starts from the teacher's weights (the teacher file
    is then read when the run starts; a resumed run's checkpoint overrides them).
    ``local_weight`` (C, 1 in the paper) multiplies the local losses; since every hidden
    layer learns from its own local loss alone, C only rescales the hidden layers' gradients
    against the classifier's. Adam's per-parameter step normalisation undoes it, so under
    Adam (the paper's optimiser) the default 16 trains as the paper's 1; under SGD the
    paper's 1 leaves the hidden layers' steps too small (docs/results.md, "Local Tandem
    Learning": 12 points at equal budget). ``q`` is
    the targets' normalising quantile (0.999 in the paper), per layer."""

    name = "ltl"

    def __init__(self, objective: RateCE, teacher: str | Path | nn.Module | None,
                 finetune_epochs: int = 0, init_from_teacher: bool = False,
                 local_weight: float = 16.0, q: float = PERCENTILE) -> None:
        super().__init__(objective)
        if teacher is None:
            raise ValueError("method 'ltl' needs a teacher: --set teacher=RUN_DIR/checkpoints/best.pt "
                             "(a method=ann run of the same model) or an exported model file")
        self.teacher, self.finetune_epochs = teacher, finetune_epochs
        self.init_from_teacher = init_from_teacher
        self.local_weight, self.q = local_weight, q

    @classmethod
    def from_config(cls, method_cfg: Any, objective: RateCE) -> "LTL":
        return cls(objective, method_cfg.teacher, method_cfg.finetune_epochs, method_cfg.init_from_teacher,
                   method_cfg.local_weight)

    def wrap(self, model: nn.Module) -> TandemNet:
        """A ``TandemNet`` of ``model`` and the teacher (loaded on the first training step, or
        now to initialise the student from it)."""
        self.net = TandemNet(model, self.teacher, q=self.q)
        if self.init_from_teacher:
            self.net.init_from_teacher()
        return self.net

    def export(self, trained: nn.Module) -> nn.Module:
        """The plain student."""
        return trained.export()

    def set_progress(self, epoch: int, epochs: int, step: int, steps_per_epoch: int) -> None:
        """Local losses until the last ``finetune_epochs`` epochs, then end-to-end training."""
        self.net.local = epoch < epochs - self.finetune_epochs

    def loss(self, output: TandemOutput | Tensor, target: Tensor) -> tuple[Tensor, Tensor]:
        """``(objective(logits) + local_weight * sum_l local_l, logits [T, B, K])``; the objective
        alone for plain logits."""
        if isinstance(output, Tensor):  # evaluation or end-to-end fine-tuning
            return self.objective.loss(output, target), output
        local = torch.stack(list(output.local.values())).sum()
        return self.objective.loss(output.logits, target) + self.local_weight * local, output.logits


"""Multi-step spiking neurons: LIF, IF, PLIF and the functional ``lif_multistep``.

Every neuron takes the whole sequence ``x_seq: [T, B, ...]`` and returns the whole
spike sequence ``[T, B, ...]``; nothing is kept on the module between calls, so
there is no ``reset()`` to forget. An initial membrane ``v_init: [B, ...]`` may be
passed and the final membrane returned with ``return_state=True``.

Dynamics, for t = 0..T-1, from ``v = v_init`` (default ``v_reset``, or
0 for a soft reset), with ``d = 1/tau`` and ``r = v_reset`` (0 for a soft reset):

    decay_input=False:  h[t] = v + d (r - v) + x[t]
    decay_input=True:   h[t] = v + d (x[t] - (v - r))
    s[t] = Θ(h[t] - v_threshold)
    hard reset:         v = h (1 - s) + v_reset s
    soft reset:         v = h - v_threshold s          (v_reset=None)

Backends (``BACKENDS``): ``"torch"`` (reference: autograd through a plain loop) and the
fused operator ``torch.ops.spikegrad.lif`` (``kernels.lif``: one autograd node per layer;
forward saves only its inputs, backward evaluates the surrogate derivative on all of
``[T, N]`` at once, then runs one reverse-time scan) with one of its kernel sets:
``"eager"`` (the plain torch loops of ``kernels.fused``, no compiler), ``"fused"`` (the
same loops compiled by ``torch.compile``: the fast path on CPU) and ``"triton"`` (the
loops over T as Triton kernels, ``kernels.triton_lif``: CUDA, or CPU under
``TRITON_INTERPRET=1``; float64 or a non-spiking surrogate run ``"fused"`` instead).
``"auto"`` is ``$SPIKEGRAD_BACKEND`` when set, else the operator's own choice for the
tensor's device (``default_backend``): ``"triton"`` for CUDA tensors when triton is
installed, else ``"fused"``.
"""
from __future__ import annotations

import math
import os
from typing import Any, Callable

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from . import surrogate as sg
from .memory import mark_spikes
from .kernels import fused
from .kernels import lif as lif_op
from .kernels.lif import KERNELS, surrogate_handle, triton_installed

__all__ = ["lif_multistep", "LIF", "IF", "PLIF", "BaseNeuron", "BACKENDS", "default_backend"]

BACKENDS = ("auto", "torch", *KERNELS)
"""Every backend name: ``"auto"``, the reference ``"torch"`` and the operator's kernel sets."""


def default_backend(device: torch.device | str | None = None) -> str:
    """What ``backend="auto"`` means for tensors on ``device``: ``$SPIKEGRAD_BACKEND`` if
    set, else ``"triton"`` on CUDA when triton is installed, else ``"fused"`` (the
    operator's registered implementations for those devices)."""
    name = _env_backend()
    if name is None:
        on_cuda = device is not None and torch.device(device).type == "cuda"
        return "triton" if on_cuda and triton_installed() else "fused"
    return name


def _env_backend() -> str | None:
    name = os.environ.get("SPIKEGRAD_BACKEND")
    if name is not None and name not in BACKENDS[1:]:
        raise ValueError(f"SPIKEGRAD_BACKEND must be one of {', '.join(BACKENDS[1:])}, got {name!r}")
    return name


def _check(x_seq: Tensor, tau: float | Tensor | None, v_threshold: float, backend: str) -> None:
    if not isinstance(x_seq, Tensor) or x_seq.dim() < 2:
        shape = tuple(x_seq.shape) if isinstance(x_seq, Tensor) else type(x_seq).__name__
        raise ValueError(f"x_seq must be a tensor [T, B, ...] with a leading time dimension, got {shape}; "
                         "for one time step of [B, ...] use neuron.step(x, v)")
    if tau is not None and not (isinstance(tau, (int, float)) and tau >= 1
                                or isinstance(tau, Tensor) and tau.dim() == 0):
        raise ValueError(f"tau must be >= 1 (a leak of at most 1 per step), got {tau}")
    if not v_threshold > 0:
        raise ValueError(f"v_threshold must be positive, got {v_threshold}")
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {', '.join(BACKENDS)}, got {backend!r}")


def _reference(x_seq: Tensor, v: Tensor, decay: Tensor | float, decay_input: bool,
               v_threshold: float, v_reset: float | None, detach_reset: bool,
               surrogate: sg.Surrogate) -> tuple[Tensor, Tensor]:
    """Autograd through a plain loop over T: the definition every backend is tested against."""
    rest = 0.0 if v_reset is None else v_reset
    spikes = []
    spike = surrogate.stepper(x_seq.shape)
    for t, x in enumerate(x_seq.unbind(0)):
        h = fused.charge(v, x, decay, rest, decay_input)
        s = spike(h - v_threshold, t)
        v = fused.reset(h, s.detach() if detach_reset else s, v_threshold, v_reset)
        spikes.append(s)
    return torch.stack(spikes), v


def lif_multistep(x_seq: Tensor, v_init: Tensor | None = None, *, tau: float | Tensor = 2.0,
                  decay_input: bool = False, v_threshold: float = 1.0,
                  v_reset: float | None = 0.0, detach_reset: bool = False,
                  surrogate: sg.Surrogate | str | dict | None = None, backend: str = "auto",
                  return_state: bool = False, residual: Tensor | None = None,
                  norm: nn.Module | None = None) -> Tensor | tuple[Tensor, Tensor]:
    """Run a LIF neuron over ``x_seq: [T, B, ...]``; returns spikes ``[T, B, ...]``.

    ``tau >= 1``; ``math.inf`` gives IF (no leak); a 0-dim tensor ``tau`` (not checked) is
    a learnable time constant, which gets its gradient as PLIF's does. With
    ``return_state=True`` returns ``(spikes, v_final)``, ``v_final: [B, ...]``.
    ``residual`` and ``norm`` are ``BaseNeuron.forward``'s: ``lif_multistep(x, residual=r,
    norm=bn)`` equals ``lif_multistep(bn(x) + r)``, computed without writing either.
    """
    _check(x_seq, tau, v_threshold, backend)
    _check_extra(x_seq, residual)
    return _run(x_seq, v_init, 1.0 / tau, decay_input, v_threshold, v_reset, detach_reset,
                sg.resolve(surrogate), backend, return_state, residual, norm)


def _check_extra(x_seq: Tensor, residual: Tensor | None) -> None:
    if residual is not None and residual.shape != x_seq.shape:
        raise ValueError(f"residual must have the input's shape {tuple(x_seq.shape)}, "
                         f"got {tuple(residual.shape)}")


def _normalised(norm: Callable[[Tensor], Tensor], x_seq: Tensor) -> Tensor:
    """``norm`` (of ``[N, C, ...]``, e.g. a batch-norm module) applied to ``x_seq: [T, B, C, ...]``
    over ``T*B``."""
    return norm(x_seq.flatten(0, 1)).unflatten(0, x_seq.shape[:2])


def _run(x_seq: Tensor, v_init: Tensor | None, decay: Tensor | float, decay_input: bool,
         v_threshold: float, v_reset: float | None, detach_reset: bool,
         surrogate: sg.Surrogate, backend: str, return_state: bool, residual: Tensor | None = None,
         norm: nn.Module | None = None):
    decay_input = decay_input and not (isinstance(decay, float) and decay == 0.0)  # IF: no leak
    if v_init is not None and v_init.shape != x_seq.shape[1:]:
        raise ValueError(f"v_init must have shape {tuple(x_seq.shape[1:])} (x_seq without T), "
                         f"got {tuple(v_init.shape)}")
    if backend == "auto":
        backend = _env_backend() or "auto"  # "auto": the operator's registered choice per device
    folds = backend != "torch" and callable(getattr(norm, "folds", None)) and norm.folds(x_seq)
    if norm is not None and not folds:
        x_seq, norm = _normalised(norm, x_seq), None
    if backend == "torch":
        v_init = fused.resting(x_seq, v_reset) if v_init is None else v_init
        x_seq = x_seq if residual is None else x_seq + residual
        spikes, v = _reference(x_seq, v_init, decay, decay_input, v_threshold, v_reset,
                               detach_reset, surrogate)
        if surrogate.spiking:
            mark_spikes(spikes)
        return (spikes, v) if return_state else spikes
    learnable = isinstance(decay, Tensor)
    spikes, v, mean, var = lif_op.run(
        x_seq, residual, v_init, decay if learnable else None,
        None if norm is None else norm.weight, None if norm is None else norm.bias,
        fixed_decay=0.0 if learnable else float(decay), decay_input=decay_input,
        v_threshold=float(v_threshold), v_reset=v_reset, detach_reset=detach_reset,
        surrogate=surrogate_handle(surrogate), norm_eps=float(norm.eps) if norm is not None else 0.0,
        keep_state=return_state, mark_spikes=surrogate.spiking, backend=backend)
    if norm is not None:
        norm.record(mean, var, x_seq.numel() // x_seq.shape[2])
    return (spikes, v) if return_state else spikes


class BaseNeuron(nn.Module):
    """Common options of the multi-step neurons (see the module docstring)."""

    def __init__(self, v_threshold: float = 1.0, v_reset: float | None = 0.0,
                 decay_input: bool = False, detach_reset: bool = False,
                 surrogate: sg.Surrogate | str | dict | None = None, backend: str = "auto") -> None:
        super().__init__()
        if not (isinstance(v_threshold, (int, float)) and v_threshold > 0):
            raise ValueError(f"v_threshold must be a positive number, got {v_threshold!r}")
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
        self.v_threshold = float(v_threshold)
        self.v_reset = None if v_reset is None else float(v_reset)
        self.decay_input = decay_input
        self.detach_reset = detach_reset
        self.surrogate = sg.resolve(surrogate)  # an object, a name ("atan"), a dict, or None: ATan
        self.backend = backend

    def decay(self) -> Tensor | float:
        """The per-step leak ``1/tau`` (0 for IF)."""
        raise NotImplementedError

    def forward(self, x_seq: Tensor, v_init: Tensor | None = None, return_state: bool = False,
                residual: Tensor | None = None, norm: nn.Module | None = None
                ) -> Tensor | tuple[Tensor, Tensor]:
        """``x_seq: [T, B, ...]`` -> spikes ``[T, B, ...]`` (and ``v_final: [B, ...]``).

        ``residual`` (same shape) is added to the input: ``sn(x, residual=r)`` equals
        ``sn(x + r)``, but the fused backends never store the sum (a ResNet block's
        ``x`` and ``r`` are kept for backward by the layers that made them anyway).
        ``norm`` (a batch norm over ``[T*B, C, ...]``) is applied first, before the
        residual: ``sn(x, norm=bn)`` equals ``sn(bn(x))``; the ``eager`` and ``fused``
        backends fold a training-mode ``memory.BatchNorm2d`` into their loop
        (``BatchNorm2d.folds``), so the normalised input is never written (the batch
        norm's own ``forward`` and its hooks are then not run).
        """
        _check(x_seq, None, self.v_threshold, self.backend)
        _check_extra(x_seq, residual)
        return _run(x_seq, v_init, self.decay(), self.decay_input, self.v_threshold, self.v_reset,
                    self.detach_reset, self.surrogate, self.backend, return_state, residual, norm)

    def step(self, x: Tensor, v: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """One time step, state explicit (snnTorch's ``spk, mem = lif(x, mem)``):
        ``x: [B, ...]``, ``v: [B, ...]`` (None: the resting membrane) -> ``(spikes [B, ...],
        v [B, ...])``. Looping this over T gives ``forward``'s spikes; ``forward`` on the whole
        ``[T, B, ...]`` is faster (one fused loop) and is what the models use."""
        spikes, v_next = self(x.unsqueeze(0), v, return_state=True)
        return spikes[0], v_next

    @staticmethod
    def input_of(args: tuple, kwargs: dict) -> Tensor:
        """The whole input ``[T, B, ...]`` of a call ``forward(*args, **kwargs)`` (norm and
        residual included), for hooks registered with ``with_kwargs=True``."""
        residual = kwargs.get("residual", args[3] if len(args) > 3 else None)
        norm = kwargs.get("norm", args[4] if len(args) > 4 else None)
        x_seq = args[0]
        if norm is not None:  # as the call normalised it, without counting the batch again
            stats = (None, None) if norm.training else (norm.running_mean, norm.running_var)
            x_seq = _normalised(lambda flat: F.batch_norm(flat, *stats, norm.weight, norm.bias,
                                                          norm.training, 0.0, norm.eps), x_seq)
        return x_seq if residual is None else x_seq + residual

    def extra_repr(self) -> str:
        return (f"v_threshold={self.v_threshold}, v_reset={self.v_reset}, "
                f"decay_input={self.decay_input}, detach_reset={self.detach_reset}, "
                f"backend={self.backend!r}")


class LIF(BaseNeuron):
    """Leaky integrate-and-fire neuron with a fixed time constant ``tau >= 1``."""

    def __init__(self, tau: float = 2.0, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if not (isinstance(tau, (int, float)) and tau >= 1):
            raise ValueError(f"tau must be a number >= 1, got {tau!r}")
        self.tau = float(tau)

    def decay(self) -> float:
        return 1.0 / self.tau

    def extra_repr(self) -> str:
        return f"tau={self.tau}, " + super().extra_repr()


class IF(BaseNeuron):
    """Integrate-and-fire neuron: LIF without leak (``decay_input`` does not apply)."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.decay_input = False

    def decay(self) -> float:
        return 0.0


class PLIF(BaseNeuron):
    """Parametric LIF: ``1/tau = sigmoid(w)`` with one learnable scalar ``w`` per layer."""

    def __init__(self, init_tau: float = 2.0, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if not (isinstance(init_tau, (int, float)) and init_tau > 1):
            raise ValueError(f"init_tau must be a number > 1, got {init_tau!r}")
        self.w = nn.Parameter(torch.tensor(-math.log(init_tau - 1.0)))

    def decay(self) -> Tensor:
        return torch.sigmoid(self.w)

    def extra_repr(self) -> str:
        return f"tau={1.0 / float(torch.sigmoid(self.w.detach())):.4f}, " + super().extra_repr()

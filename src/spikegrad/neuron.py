"""Multi-step spiking neurons: LIF, IF, PLIF and the functional ``lif_multistep``.

Every neuron takes the whole sequence ``x_seq: [T, B, ...]`` and returns the whole
spike sequence ``[T, B, ...]``; nothing is kept on the module between calls, so
there is no ``reset()`` to forget. An initial membrane ``v_init: [B, ...]`` may be
passed and the final membrane returned with ``return_state=True``.

Dynamics (METHODS.md), for t = 0..T-1, from ``v = v_init`` (default ``v_reset``, or
0 for a soft reset), with ``d = 1/tau`` and ``r = v_reset`` (0 for a soft reset):

    decay_input=False:  h[t] = v + d (r - v) + x[t]
    decay_input=True:   h[t] = v + d (x[t] - (v - r))
    s[t] = Θ(h[t] - v_threshold)
    hard reset:         v = h (1 - s) + v_reset s
    soft reset:         v = h - v_threshold s          (v_reset=None)

Backends: ``"torch"`` (reference: autograd through a plain loop), ``"eager"``
(one autograd node per layer: a forward loop that saves only ``h``, and a backward
that evaluates the surrogate derivative on all of ``[T, N]`` at once, then runs one
reverse-time scan; see ``kernels.fused``), ``"fused"`` (the same two functions
compiled by ``torch.compile``: the fast path on CPU) and ``"triton"`` (the loops over T
as Triton kernels, ``kernels.triton_lif``: CUDA, or CPU under ``TRITON_INTERPRET=1``;
float64 or a non-spiking surrogate run ``"fused"`` instead). ``"auto"`` is
``$SPIKEGRAD_BACKEND`` when set, else ``"triton"`` for CUDA tensors when triton is
installed, else ``"fused"``.
"""
from __future__ import annotations

import importlib.util
import math
import os
from typing import Any, Callable

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from . import surrogate as sg
from .memory import mark_spikes
from .kernels import fused

__all__ = ["lif_multistep", "LIF", "IF", "PLIF", "BaseNeuron", "BACKENDS", "default_backend"]

BACKENDS = ("auto", "torch", "eager", "fused", "triton")


def default_backend(device: torch.device | str | None = None) -> str:
    """What ``backend="auto"`` means for tensors on ``device``: ``$SPIKEGRAD_BACKEND`` if
    set, else ``"triton"`` on CUDA when triton is installed, else ``"fused"``."""
    name = os.environ.get("SPIKEGRAD_BACKEND")
    if name is None:
        on_cuda = device is not None and torch.device(device).type == "cuda"
        return "triton" if on_cuda and importlib.util.find_spec("triton") is not None else "fused"
    if name not in BACKENDS[1:]:
        raise ValueError(f"SPIKEGRAD_BACKEND must be one of {', '.join(BACKENDS[1:])}, got {name!r}")
    return name


def _kernel_mode(backend: str, x_seq: Tensor, surrogate: sg.Surrogate) -> str:
    """The ``fused.lif`` mode of a non-reference backend for this input."""
    if backend != "triton":
        return backend
    if not (x_seq.is_cuda or os.environ.get("TRITON_INTERPRET") == "1"):
        raise ValueError(f"backend 'triton' needs CUDA tensors (or TRITON_INTERPRET=1 for CPU), "
                         f"got a tensor on {x_seq.device}")
    from .kernels.triton_lif import DTYPES
    return "triton" if surrogate.spiking and x_seq.dtype in DTYPES else "fused"


def _check(x_seq: Tensor, tau: float | None, v_threshold: float, backend: str) -> None:
    if not isinstance(x_seq, Tensor) or x_seq.dim() < 2:
        shape = tuple(x_seq.shape) if isinstance(x_seq, Tensor) else type(x_seq).__name__
        raise ValueError(f"x_seq must be a tensor [T, B, ...] with a leading time dimension, got {shape}")
    if tau is not None and not (isinstance(tau, (int, float)) and tau >= 1):
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


def lif_multistep(x_seq: Tensor, v_init: Tensor | None = None, *, tau: float = 2.0,
                  decay_input: bool = False, v_threshold: float = 1.0,
                  v_reset: float | None = 0.0, detach_reset: bool = False,
                  surrogate: sg.Surrogate | None = None, backend: str = "auto",
                  return_state: bool = False) -> Tensor | tuple[Tensor, Tensor]:
    """Run a LIF neuron over ``x_seq: [T, B, ...]``; returns spikes ``[T, B, ...]``.

    ``tau >= 1``; ``math.inf`` gives IF (no leak). With ``return_state=True`` returns ``(spikes, v_final)``, ``v_final: [B, ...]``.
    """
    _check(x_seq, tau, v_threshold, backend)
    return _run(x_seq, v_init, 1.0 / tau, decay_input, v_threshold, v_reset, detach_reset,
                surrogate or sg.ATan(), backend, return_state)


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
    backend = default_backend(x_seq.device) if backend == "auto" else backend
    mode = None if backend == "torch" else _kernel_mode(backend, x_seq, surrogate)
    folds = mode in ("eager", "fused") and callable(getattr(norm, "folds", None)) and norm.folds(x_seq)
    if norm is not None and not folds:
        x_seq, norm = _normalised(norm, x_seq), None
    if mode is None:
        v_init = fused.resting(x_seq, v_reset) if v_init is None else v_init
        x_seq = x_seq if residual is None else x_seq + residual
        spikes, v = _reference(x_seq, v_init, decay, decay_input, v_threshold, v_reset,
                               detach_reset, surrogate)
    else:
        spikes, v = fused.lif(x_seq, v_init, decay, decay_input, v_threshold, v_reset,
                              detach_reset, surrogate, mode, residual, norm, return_state)
    if surrogate.spiking:
        mark_spikes(spikes)
    return (spikes, v) if return_state else spikes


class BaseNeuron(nn.Module):
    """Common options of the multi-step neurons (see the module docstring)."""

    def __init__(self, v_threshold: float = 1.0, v_reset: float | None = 0.0,
                 decay_input: bool = False, detach_reset: bool = False,
                 surrogate: sg.Surrogate | None = None, backend: str = "auto") -> None:
        super().__init__()
        if not (isinstance(v_threshold, (int, float)) and v_threshold > 0):
            raise ValueError(f"v_threshold must be a positive number, got {v_threshold!r}")
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
        self.v_threshold = float(v_threshold)
        self.v_reset = None if v_reset is None else float(v_reset)
        self.decay_input = decay_input
        self.detach_reset = detach_reset
        self.surrogate = surrogate if surrogate is not None else sg.ATan()
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
        if residual is not None and residual.shape != x_seq.shape:
            raise ValueError(f"residual must have the input's shape {tuple(x_seq.shape)}, "
                             f"got {tuple(residual.shape)}")
        return _run(x_seq, v_init, self.decay(), self.decay_input, self.v_threshold, self.v_reset,
                    self.detach_reset, self.surrogate, self.backend, return_state, residual, norm)

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

"""The fused multi-step LIF: one autograd node per layer instead of ~10 per time step.

Forward runs the loop over T and saves only its input ``x: [T, ...]`` (and ``v_init``
when one is given; the default resting membrane is rebuilt), nothing of its own: when
a BatchNorm feeds the neuron, that BatchNorm keeps the same tensor
(``memory.BatchNorm2d`` saves its output), so one saved tensor serves both.
Backward recomputes the pre-spike membranes ``h[t]`` from ``x`` and runs one reverse
loop over T: ``dL/dh[t] = dL/ds[t] * g[t] + dv/dh[t] * dL/dv[t]``, where
``g = surrogate.grad(h - v_th)`` (so any surrogate, Dspike's temperature and AdaLi's
bounds included, runs on every backend; MSG's mask is drawn eagerly from its own
generator and passed in), ``dv/dh`` is the reset's derivative and
``dL/dv[t] = (1 - 1/tau) * dL/dh[t+1]``. Membranes and derivatives stay per step, never
stacked: compiled, each half is one loop over the neurons with the T steps in
registers, which reads the input once and writes only its outputs.

Both halves are plain torch functions; backend ``"fused"`` runs them through
``torch.compile``, ``"eager"`` runs them as they are (no compiler needed, for debugging
and platforms without one); ``"triton"`` (``kernels.triton_lif``) shares the
derivatives (``slopes``, ``decay_gradient``) and writes the loops over T as kernels.
"""
from __future__ import annotations

import functools
from typing import Any, Callable, Sequence

import torch
from torch import Tensor

from ..memory import memory_order

__all__ = ["lif", "charge", "reset", "resting", "membranes", "forward_scan", "slopes", "decay_gradient",
           "backward"]


def charge(v: Tensor, x: Tensor, decay: Tensor | float, rest: float, decay_input: bool) -> Tensor:
    """One step's pre-spike membrane ``h`` from ``v`` and input ``x`` (same shapes).

    Shared by every backend so that their spikes agree bit for bit.
    """
    keep = 1.0 - decay
    if decay_input:
        return v * keep + decay * (x + rest)
    return v * keep + (x + decay * rest) if rest != 0.0 else v * keep + x


def reset(h: Tensor, s: Tensor, v_threshold: float, v_reset: float | None) -> Tensor:
    """Membrane after firing: hard reset to ``v_reset`` or soft (subtract) when ``None``."""
    return h - v_threshold * s if v_reset is None else h * (1 - s) + v_reset * s


def resting(x_seq: Tensor, v_reset: float | None) -> Tensor:
    """The default initial membrane ``[...]`` for ``x_seq: [T, ...]``: ``v_reset`` (0 when soft)."""
    return torch.full_like(x_seq[0], 0.0 if v_reset is None else v_reset)


def membranes(x_seq: Tensor, residual: Tensor | None, v: Tensor | None, decay: Tensor | float,
              opts: tuple, surrogate: Any) -> tuple[list[Tensor], Tensor]:
    """The loop over the input ``x_seq (+ residual)``, both ``[T, ...]``, from ``v`` (None:
    resting); returns ``(h, v_final [...])`` with ``h`` the pre-spike membranes, one
    ``[...]`` tensor per step. They are not stacked: compiled, every use of ``h[t]`` fuses
    into the loop and no ``[T, ...]`` membrane tensor is ever written."""
    decay_input, v_threshold, v_reset, _ = opts
    rest = 0.0 if v_reset is None else v_reset
    v = resting(x_seq, v_reset) if v is None else v
    hs = []
    for t, x in enumerate(x_seq.unbind(0)):
        x = x if residual is None else x + residual[t]
        h = charge(v, x, decay, rest, decay_input)
        v = reset(h, surrogate.activation(h - v_threshold), v_threshold, v_reset)
        hs.append(h)
    return hs, v


def forward_scan(x_seq: Tensor, residual: Tensor | None, v: Tensor | None, decay: Tensor | float,
                 opts: tuple, surrogate: Any) -> tuple[Tensor, Tensor]:
    """Forward over ``x_seq (+ residual): [T, ...]``; returns ``(spikes [T, ...], v_final [...])``."""
    hs, v = membranes(x_seq, residual, v, decay, opts, surrogate)
    return torch.stack([surrogate.activation(h - opts[1]) for h in hs]), v


def slopes(h: Tensor, mask: Tensor | None, opts: tuple, surrogate: Any) -> tuple[Tensor, Tensor]:
    """Elementwise on pre-spike membranes ``h`` of any shape: ``(ds/dh, dv/dh)``, the
    surrogate derivative (times MSG's keep-``mask`` when given) and the reset's
    derivative (through the spike unless ``detach_reset``)."""
    _, v_threshold, v_reset, detach_reset = opts
    centred = h - v_threshold
    g = surrogate.grad(centred)
    g = g * mask if mask is not None else g
    if v_reset is None:
        return g, torch.ones_like(g) if detach_reset else 1 - v_threshold * g
    s = surrogate.activation(centred)
    return g, 1 - s if detach_reset else (1 - s) + (v_reset - h) * g


def decay_gradient(grad_h: Sequence[Tensor], hs: Sequence[Tensor], x_seq: Tensor,
                   residual: Tensor | None, v_init: Tensor | None, opts: tuple,
                   surrogate: Any) -> Tensor:
    """``dL/d(1/tau)`` (a scalar) from ``dL/dh`` and the membranes ``h``, each a ``[T, ...]``
    tensor or a sequence of ``T`` steps: the sum of ``dL/dh[t] * dh[t]/d(1/tau)``."""
    decay_input, v_threshold, v_reset, _ = opts
    rest = 0.0 if v_reset is None else v_reset
    v_prev = resting(x_seq, v_reset) if v_init is None else v_init
    total = x_seq.new_zeros(())
    for t, (grad, h) in enumerate(zip(grad_h, hs)):
        x = x_seq[t] if residual is None else x_seq[t] + residual[t]
        total = total + (grad * (x - (v_prev - rest) if decay_input else rest - v_prev)).sum()
        v_prev = reset(h, surrogate.activation(h - v_threshold), v_threshold, v_reset)
    return total


def backward(x_seq: Tensor, residual: Tensor | None, v_init: Tensor | None, grad_spikes: Tensor,
             grad_v: Tensor, decay: Tensor | float, opts: tuple, surrogate: Any,
             mask: Tensor | None, want_decay: bool) -> tuple[Tensor, Tensor, Tensor | None]:
    """Gradients ``(dL/dx [T, ...], dL/dv_init [...], dL/d(1/tau) or None)`` (``dL/dx`` is
    also the residual's); ``v_init`` None is the resting membrane.

    ``mask`` (MSG's keep-mask ``[T, ...]``, or None) multiplies the surrogate derivative.
    One reverse loop: ``dL/dh[t] = dL/ds[t] ds/dh[t] + dv/dh[t] dL/dv[t]`` with
    ``dL/dv[t] = (1 - 1/tau) dL/dh[t+1]`` (``grad_v`` after the last step)."""
    hs, _ = membranes(x_seq, residual, v_init, decay, opts, surrogate)
    keep = 1.0 - decay
    grad_h, grad_v_t = [], grad_v
    for t in reversed(range(len(hs))):
        g, dv_dh = slopes(hs[t], None if mask is None else mask[t], opts, surrogate)
        grad_h.append(grad_spikes[t] * g + dv_dh * grad_v_t)
        grad_v_t = keep * grad_h[-1]
    grad_h.reverse()
    grad_decay = decay_gradient(grad_h, hs, x_seq, residual, v_init, opts, surrogate) if want_decay else None
    grad_x = torch.stack(grad_h)
    return grad_x * decay if opts[0] else grad_x, grad_v_t, grad_decay


@functools.lru_cache(maxsize=None)
def _compiled(fn: Callable) -> Callable:
    # one graph per (surrogate type, options, dtype): allow more than dynamo's default 8
    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
    return torch.compile(fn)


def _functions(mode: str) -> tuple[Callable, Callable]:
    """``(forward_scan, backward)`` of a backend: ``eager``, ``fused`` (compiled) or ``triton``."""
    if mode == "fused":
        return _compiled(forward_scan), _compiled(backward)
    if mode == "triton":
        from . import triton_lif  # imports triton: only when this backend runs
        return triton_lif.forward_scan, triton_lif.backward
    return forward_scan, backward


class _FusedLIF(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x_seq: Tensor, residual: Tensor | None, v_init: Tensor | None,
                decay: Tensor | float, opts: tuple, surrogate: Any, mode: str) -> tuple[Tensor, Tensor]:
        scan, _ = _functions(mode)
        spikes, v_final = scan(x_seq, residual, v_init, decay, opts, surrogate)
        ctx.opts, ctx.surrogate, ctx.mode = opts, surrogate, mode
        ctx.decay_is_tensor = isinstance(decay, Tensor)
        ctx.decay = None if ctx.decay_is_tensor else decay
        ctx.save_for_backward(x_seq, residual, v_init, decay if ctx.decay_is_tensor else None)
        return spikes, v_final

    @staticmethod
    def backward(ctx: Any, grad_spikes: Tensor | None, grad_v: Tensor | None):
        x_seq, residual, v_init, decay_t = ctx.saved_tensors
        decay = decay_t if ctx.decay_is_tensor else ctx.decay
        surrogate, mask = ctx.surrogate.split_mask(x_seq)  # MSG's mask is drawn here, eagerly
        grad_spikes = torch.zeros_like(x_seq) if grad_spikes is None else grad_spikes
        grad_v = torch.zeros_like(x_seq[0]) if grad_v is None else grad_v
        want_decay = ctx.decay_is_tensor and ctx.needs_input_grad[3]
        _, fn = _functions(ctx.mode)
        grad_x, grad_v0, grad_decay = fn(x_seq, residual, v_init, grad_spikes, grad_v, decay,
                                         ctx.opts, surrogate, mask, want_decay)
        if grad_decay is not None:
            grad_decay = grad_decay.to(decay_t.dtype)
        return (grad_x, grad_x if residual is not None else None,
                grad_v0 if v_init is not None else None, grad_decay, None, None, None)


def _rows(t: Tensor, order: list[int]) -> Tensor:
    """``t: [T, ...]`` as ``[T, N]`` rows in ``order``'s memory layout (a view when it has it)."""
    return t.permute(order).reshape(t.shape[0], -1)


def _unrows(rows: Tensor, like: Tensor, order: list[int]) -> Tensor:
    """``_rows``' inverse: ``rows`` viewed with ``like``'s shape (and its strides when dense)."""
    inverse = sorted(range(len(order)), key=order.__getitem__)
    return rows.view([like.shape[d] for d in order]).permute(inverse)


def lif(x_seq: Tensor, v_init: Tensor | None, decay: Tensor | float, decay_input: bool,
        v_threshold: float, v_reset: float | None, detach_reset: bool, surrogate: Any,
        mode: str = "fused", residual: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Fused LIF over the input ``x_seq (+ residual)``, ``[T, B, ...]``, from ``v_init: [B, ...]``
    (None: resting); returns ``(spikes [T, B, ...], v_final [B, ...])``. The residual is
    added inside, so the sum is never stored: backward keeps ``x_seq`` and ``residual``,
    which the layers before it keep anyway. ``mode``: ``"fused"`` (compiled), ``"eager"``
    or ``"triton"``.

    The kernels see every tensor as ``[T, N]`` rows in ``x_seq``'s memory layout
    (channels-last included, without a copy); the spikes come back in that layout.
    Inside ``torch.compile`` the tensors go in as they are."""
    opts = (decay_input, v_threshold, v_reset, detach_reset)
    if torch.compiler.is_compiling():  # inductor plans its own loops; rows would add symbolic reshapes
        return _FusedLIF.apply(x_seq, residual, v_init, decay, opts, surrogate, mode)
    order = memory_order(x_seq) or list(range(x_seq.dim()))
    spikes, v_final = _FusedLIF.apply(
        _rows(x_seq, order), None if residual is None else _rows(residual, order),
        None if v_init is None else _rows(v_init.unsqueeze(0), order)[0], decay, opts, surrogate, mode)
    return _unrows(spikes, x_seq, order), _unrows(v_final.unsqueeze(0), x_seq[:1], order)[0]

"""The fused multi-step LIF: one autograd node per layer instead of ~10 per time step.

Forward runs the loop over T and saves only its input ``x: [T, ...]`` (and ``v_init``
when one is given; the default resting membrane is rebuilt), nothing of its own: when
a BatchNorm feeds the neuron, that BatchNorm keeps the same tensor
(``memory.BatchNorm2d`` saves its output), so one saved tensor serves both.
Backward is split in two:

0. the pre-spike membranes ``h: [T, ...]`` are recomputed from ``x`` (one cheap scan);
1. the surrogate derivative ``g = surrogate.grad(h - v_th)`` on all of ``[T, ...]``
   at once, in plain torch, so any surrogate (Dspike temperature, AdaLi bounds) runs
   on every backend; MSG's mask is drawn eagerly from its own generator and passed in;
2. one reverse-time linear scan that consumes it:
   ``dL/dh[t] = a[t] + c[t] * dL/dh[t+1]`` with ``a = dL/ds * g`` and
   ``c = (1 - 1/tau) * dv/dh`` (the reset's derivative, zero through detach_reset).

Both halves are plain torch functions; backend ``"fused"`` runs them through
``torch.compile`` (inductor fuses each into a few loops), ``"eager"`` runs them as
they are (no compiler needed, for debugging and platforms without one).
"""
from __future__ import annotations

import functools
from typing import Any, Callable, NamedTuple

import torch
from torch import Tensor

from ..memory import memory_order

__all__ = ["lif", "charge", "reset", "resting", "membranes", "forward_scan", "backward_scan", "backward",
           "Scans", "TORCH_SCANS"]


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
              opts: tuple, surrogate: Any) -> tuple[Tensor, Tensor]:
    """The loop over the input ``x_seq (+ residual)``, both ``[T, ...]``, from ``v`` (None:
    resting); returns ``(h_seq [T, ...], v_final [...])``."""
    decay_input, v_threshold, v_reset, _ = opts
    rest = 0.0 if v_reset is None else v_reset
    v = resting(x_seq, v_reset) if v is None else v
    hs = []
    for t, x in enumerate(x_seq.unbind(0)):
        x = x if residual is None else x + residual[t]
        h = charge(v, x, decay, rest, decay_input)
        v = reset(h, surrogate.activation(h - v_threshold), v_threshold, v_reset)
        hs.append(h)
    return torch.stack(hs), v


def forward_scan(x_seq: Tensor, residual: Tensor | None, v: Tensor | None, decay: Tensor | float,
                 opts: tuple, surrogate: Any) -> tuple[Tensor, Tensor]:
    """Forward over ``x_seq (+ residual): [T, ...]``; returns ``(spikes [T, ...], v_final [...])``."""
    h_seq, v = membranes(x_seq, residual, v, decay, opts, surrogate)
    return surrogate.activation(h_seq - opts[1]), v


def backward_scan(a: Tensor, c: Tensor, last: Tensor) -> Tensor:
    """Solve ``g[t] = a[t] + c[t] g[t+1]`` backwards from ``g[T-1] = a[T-1] + last``; ``[T, ...]``."""
    g = a[-1] + last
    out = [g]
    for a_t, c_t in zip(reversed(a[:-1].unbind(0)), reversed(c[:-1].unbind(0))):
        g = torch.addcmul(a_t, c_t, g)
        out.append(g)
    out.reverse()
    return torch.stack(out)


class Scans(NamedTuple):
    """The two loops over T that ``backward`` runs: ``membranes`` and ``backward_scan``."""

    membranes: Callable
    backward_scan: Callable


TORCH_SCANS = Scans(membranes, backward_scan)


def backward(x_seq: Tensor, residual: Tensor | None, v_init: Tensor | None, grad_spikes: Tensor,
             grad_v: Tensor, decay: Tensor | float, opts: tuple, surrogate: Any,
             mask: Tensor | None, want_decay: bool,
             scans: Scans = TORCH_SCANS) -> tuple[Tensor, Tensor, Tensor | None]:
    """Gradients ``(dL/dx [T, ...], dL/dv_init [...], dL/d(1/tau) or None)`` (``dL/dx`` is
    also the residual's); ``v_init`` None is the resting membrane.

    ``mask`` (MSG's keep-mask ``[T, ...]``, or None) multiplies the surrogate derivative;
    ``scans`` are torch's loops or the Triton kernels (``kernels.triton_lif.SCANS``).
    """
    decay_input, v_threshold, v_reset, detach_reset = opts
    h_seq, _ = scans.membranes(x_seq, residual, v_init, decay, opts, surrogate)
    centred = h_seq - v_threshold
    g = surrogate.grad(centred)
    g = g * mask if mask is not None else g
    s = surrogate.activation(centred)
    if v_reset is None:
        dv_dh = torch.ones_like(g) if detach_reset else 1 - v_threshold * g
    else:
        dv_dh = 1 - s if detach_reset else (1 - s) + (v_reset - h_seq) * g
    keep = 1.0 - decay
    grad_h = scans.backward_scan(grad_spikes * g, keep * dv_dh, dv_dh[-1] * grad_v)
    grad_x = grad_h * decay if decay_input else grad_h
    grad_decay = None
    if want_decay:
        rest = 0.0 if v_reset is None else v_reset
        v_first = resting(x_seq, v_reset) if v_init is None else v_init
        v_prev = torch.cat([v_first.unsqueeze(0), reset(h_seq, s, v_threshold, v_reset)[:-1]])
        x_all = x_seq if residual is None else x_seq + residual
        dh_dd = x_all - (v_prev - rest) if decay_input else rest - v_prev
        grad_decay = (grad_h * dh_dd).sum()
    return grad_x, grad_h[0] * keep, grad_decay


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
        return triton_lif.forward_scan, functools.partial(backward, scans=triton_lif.SCANS)
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

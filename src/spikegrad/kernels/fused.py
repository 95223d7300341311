"""The fused multi-step LIF: one autograd node per layer instead of ~10 per time step.

Forward runs the loop over T and saves only the pre-spike membrane ``h: [T, ...]``
(spikes and membranes after reset are recomputed from it). Backward is split in two:

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
from typing import Any, Callable

import torch
from torch import Tensor

__all__ = ["lif", "charge", "reset", "forward_scan", "backward_scan"]


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


def forward_scan(x_seq: Tensor, v: Tensor, decay: Tensor | float, opts: tuple,
                 surrogate: Any) -> tuple[Tensor, Tensor, Tensor]:
    """Forward over ``x_seq: [T, ...]``; returns ``(spikes, h_seq, v_final)``."""
    decay_input, v_threshold, v_reset, _ = opts
    rest = 0.0 if v_reset is None else v_reset
    hs = []
    for x in x_seq.unbind(0):
        h = charge(v, x, decay, rest, decay_input)
        v = reset(h, surrogate.activation(h - v_threshold), v_threshold, v_reset)
        hs.append(h)
    h_seq = torch.stack(hs)
    return surrogate.activation(h_seq - v_threshold), h_seq, v


def backward_scan(a: Tensor, c: Tensor, last: Tensor) -> Tensor:
    """Solve ``g[t] = a[t] + c[t] g[t+1]`` backwards from ``g[T-1] = a[T-1] + last``; ``[T, ...]``."""
    g = a[-1] + last
    out = [g]
    for a_t, c_t in zip(reversed(a[:-1].unbind(0)), reversed(c[:-1].unbind(0))):
        g = torch.addcmul(a_t, c_t, g)
        out.append(g)
    out.reverse()
    return torch.stack(out)


def backward(h_seq: Tensor, v_init: Tensor, x_seq: Tensor | None, grad_spikes: Tensor,
             grad_v: Tensor, decay: Tensor | float, opts: tuple, surrogate: Any,
             mask: Tensor | None, want_decay: bool) -> tuple[Tensor, Tensor, Tensor | None]:
    """Gradients ``(dL/dx [T, ...], dL/dv_init [...], dL/d(1/tau) or None)``.

    ``mask`` (MSG's keep-mask, or None) multiplies the surrogate derivative.
    """
    decay_input, v_threshold, v_reset, detach_reset = opts
    centred = h_seq - v_threshold
    g = surrogate.grad(centred)
    g = g * mask if mask is not None else g
    s = surrogate.activation(centred)
    if v_reset is None:
        dv_dh = torch.ones_like(g) if detach_reset else 1 - v_threshold * g
    else:
        dv_dh = 1 - s if detach_reset else (1 - s) + (v_reset - h_seq) * g
    keep = 1.0 - decay
    grad_h = backward_scan(grad_spikes * g, keep * dv_dh, dv_dh[-1] * grad_v)
    grad_x = grad_h * decay if decay_input else grad_h
    grad_decay = None
    if want_decay:
        rest = 0.0 if v_reset is None else v_reset
        v_prev = torch.cat([v_init.unsqueeze(0), reset(h_seq, s, v_threshold, v_reset)[:-1]])
        dh_dd = x_seq - (v_prev - rest) if decay_input else rest - v_prev
        grad_decay = (grad_h * dh_dd).sum()
    return grad_x, grad_h[0] * keep, grad_decay


@functools.lru_cache(maxsize=None)
def _compiled(fn: Callable) -> Callable:
    # one graph per (surrogate type, options, dtype): allow more than dynamo's default 8
    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
    return torch.compile(fn)


class _FusedLIF(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x_seq: Tensor, v_init: Tensor, decay: Tensor | float, opts: tuple,
                surrogate: Any, compiled: bool) -> tuple[Tensor, Tensor]:
        scan = _compiled(forward_scan) if compiled else forward_scan
        spikes, h_seq, v_final = scan(x_seq, v_init, decay, opts, surrogate)
        ctx.opts, ctx.surrogate, ctx.compiled = opts, surrogate, compiled
        ctx.decay_is_tensor = isinstance(decay, Tensor)
        ctx.decay = None if ctx.decay_is_tensor else decay
        saved_x = x_seq if ctx.decay_is_tensor and opts[0] else None
        ctx.save_for_backward(h_seq, v_init, decay if ctx.decay_is_tensor else None, saved_x)
        return spikes, v_final

    @staticmethod
    def backward(ctx: Any, grad_spikes: Tensor | None, grad_v: Tensor | None):
        h_seq, v_init, decay_t, x_seq = ctx.saved_tensors
        decay = decay_t if ctx.decay_is_tensor else ctx.decay
        surrogate, mask = ctx.surrogate.split_mask(h_seq)  # MSG's mask is drawn here, eagerly
        grad_spikes = torch.zeros_like(h_seq) if grad_spikes is None else grad_spikes
        grad_v = torch.zeros_like(h_seq[0]) if grad_v is None else grad_v
        want_decay = ctx.decay_is_tensor and ctx.needs_input_grad[2]
        fn = _compiled(backward) if ctx.compiled else backward
        grad_x, grad_v0, grad_decay = fn(h_seq, v_init, x_seq, grad_spikes, grad_v, decay,
                                         ctx.opts, surrogate, mask, want_decay)
        if grad_decay is not None:
            grad_decay = grad_decay.to(decay_t.dtype)
        return grad_x, grad_v0, grad_decay, None, None, None


def lif(x_seq: Tensor, v_init: Tensor, decay: Tensor | float, decay_input: bool,
        v_threshold: float, v_reset: float | None, detach_reset: bool, surrogate: Any,
        compiled: bool = True) -> tuple[Tensor, Tensor]:
    """Fused LIF over ``x_seq: [T, B, ...]``; returns ``(spikes [T, B, ...], v_final [B, ...])``."""
    opts = (decay_input, v_threshold, v_reset, detach_reset)
    return _FusedLIF.apply(x_seq, v_init, decay, opts, surrogate, compiled)

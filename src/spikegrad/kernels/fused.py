"""The fused multi-step LIF: one autograd node per layer instead of ~10 per time step.

Forward runs the loop over T and saves only its input ``x: [T, ...]`` (and ``v_init``
when one is given; the default resting membrane is rebuilt), nothing of its own. A
batch norm before the neuron is either a ``memory.BatchNorm2d`` that saves its output
(the tensor the neuron saves: one serves both) or, in training, folded into the loop
(``lif(..., norm=bn)``): the neuron takes the batch statistics, normalises each step on
the fly and keeps the un-normalised input, so the normalised tensor is never written;
its backward is PyTorch's batch-norm formula with ``x_hat`` rebuilt on the fly.
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
import math
from typing import Any, Callable, NamedTuple, Sequence

import torch
from torch import Tensor

from ..memory import memory_order

__all__ = ["lif", "charge", "reset", "resting", "steps", "membranes", "forward_scan", "slopes",
           "decay_gradient", "backward", "batch_stats", "folded", "norm_forward_scan",
           "norm_parameter_grads", "norm_input_grads", "Kernels", "EAGER", "kernels"]


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


def steps(x_seq: Tensor, residual: Tensor | None, affine: tuple[Tensor, Tensor] | None) -> list[Tensor]:
    """The neuron's input at each step, ``x_seq[t] (* scale + shift) (+ residual[t])``: one
    ``[...]`` tensor per step of ``x_seq: [T, ...]``. ``affine`` (a folded batch norm,
    ``(scale, shift)`` broadcasting over a step) is applied before the residual is added."""
    xs = x_seq.unbind(0)
    if affine is not None:
        xs = [torch.addcmul(affine[1], x, affine[0]) for x in xs]
    return list(xs) if residual is None else [x + r for x, r in zip(xs, residual.unbind(0))]


def membranes(x_seq: Tensor, residual: Tensor | None, v: Tensor | None, decay: Tensor | float,
              opts: tuple, surrogate: Any, affine: tuple[Tensor, Tensor] | None = None
              ) -> tuple[list[Tensor], Tensor]:
    """The loop over the inputs ``steps(x_seq, residual, affine)`` from ``v`` (None: resting);
    returns ``(h, v_final [...])`` with ``h`` the pre-spike membranes, one ``[...]`` tensor
    per step. They are not stacked: compiled, every use of ``h[t]`` fuses into the loop and
    no ``[T, ...]`` membrane tensor is ever written."""
    decay_input, v_threshold, v_reset, _ = opts
    rest = 0.0 if v_reset is None else v_reset
    v = resting(x_seq, v_reset) if v is None else v
    hs = []
    for x in steps(x_seq, residual, affine):
        h = charge(v, x, decay, rest, decay_input)
        v = reset(h, surrogate.activation(h - v_threshold), v_threshold, v_reset)
        hs.append(h)
    return hs, v


def forward_scan(x_seq: Tensor, residual: Tensor | None, v: Tensor | None, decay: Tensor | float,
                 opts: tuple, surrogate: Any, affine: tuple[Tensor, Tensor] | None = None,
                 keep_state: bool = True) -> tuple[Tensor, Tensor | None]:
    """Forward over ``x_seq: [T, ...]`` (see ``steps``); returns ``(spikes [T, ...], v_final
    [...])``, ``v_final`` None unless ``keep_state`` (then it is never written)."""
    hs, v = membranes(x_seq, residual, v, decay, opts, surrogate, affine)
    return torch.stack([surrogate.activation(h - opts[1]) for h in hs]), v if keep_state else None


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
                   surrogate: Any, affine: tuple[Tensor, Tensor] | None = None) -> Tensor:
    """``dL/d(1/tau)`` (a scalar) from ``dL/dh`` and the membranes ``h``, each a ``[T, ...]``
    tensor or a sequence of ``T`` steps: the sum of ``dL/dh[t] * dh[t]/d(1/tau)``."""
    decay_input, v_threshold, v_reset, _ = opts
    rest = 0.0 if v_reset is None else v_reset
    v_prev = resting(x_seq, v_reset) if v_init is None else v_init
    total = x_seq.new_zeros(())
    for grad, h, x in zip(grad_h, hs, steps(x_seq, residual, affine)):
        total = total + (grad * (x - (v_prev - rest) if decay_input else rest - v_prev)).sum()
        v_prev = reset(h, surrogate.activation(h - v_threshold), v_threshold, v_reset)
    return total


def _input_gradients(x_seq: Tensor, residual: Tensor | None, v_init: Tensor | None,
                     grad_spikes: Tensor, grad_v: Tensor | None, decay: Tensor | float, opts: tuple,
                     surrogate: Any, mask: Tensor | None, want_decay: bool,
                     affine: tuple[Tensor, Tensor] | None) -> tuple[list[Tensor], Tensor | None, Tensor | None]:
    """``backward``'s gradients with ``dL/d(input)`` one ``[...]`` tensor per step."""
    hs, _ = membranes(x_seq, residual, v_init, decay, opts, surrogate, affine)
    keep = 1.0 - decay
    grad_h, grad_v_t = [], grad_v
    for t in reversed(range(len(hs))):
        g, dv_dh = slopes(hs[t], None if mask is None else mask[t], opts, surrogate)
        grad_s = grad_spikes[t] * g
        grad_h.append(grad_s if grad_v_t is None else grad_s + dv_dh * grad_v_t)
        grad_v_t = keep * grad_h[-1]
    grad_h.reverse()
    grad_decay = (decay_gradient(grad_h, hs, x_seq, residual, v_init, opts, surrogate, affine)
                  if want_decay else None)
    grad_input = [g * decay for g in grad_h] if opts[0] else grad_h
    return grad_input, None if v_init is None else grad_v_t, grad_decay


def backward(x_seq: Tensor, residual: Tensor | None, v_init: Tensor | None, grad_spikes: Tensor,
             grad_v: Tensor | None, decay: Tensor | float, opts: tuple, surrogate: Any,
             mask: Tensor | None, want_decay: bool) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """Gradients ``(dL/dx [T, ...], dL/dv_init [...] or None, dL/d(1/tau) or None)``
    (``dL/dx`` is also the residual's); ``v_init`` None is the resting membrane (and gets
    no gradient), ``grad_v`` None a final membrane without one.

    ``mask`` (MSG's keep-mask ``[T, ...]``, or None) multiplies the surrogate derivative.
    One reverse loop: ``dL/dh[t] = dL/ds[t] ds/dh[t] + dv/dh[t] dL/dv[t]`` with
    ``dL/dv[t] = (1 - 1/tau) dL/dh[t+1]`` (``grad_v`` after the last step)."""
    grad_x, grad_v0, grad_decay = _input_gradients(x_seq, residual, v_init, grad_spikes, grad_v, decay,
                                                   opts, surrogate, mask, want_decay, None)
    return torch.stack(grad_x), grad_v0, grad_decay


# --- batch norm folded into the neuron: x_seq is [T, P, C, Q], per-channel vectors [C] ----------

def batch_stats(x_seq: Tensor, eps: float) -> tuple[Tensor, Tensor, Tensor]:
    """Per-channel ``(mean, biased var, 1/sqrt(var + eps))``, each ``[C]``, of ``x_seq: [T, P, C, Q]``."""
    var, mean = torch.var_mean(x_seq, dim=(0, 1, 3), correction=0)
    return mean, var, torch.rsqrt(var + eps)


def folded(weight: Tensor, bias: Tensor, mean: Tensor, rstd: Tensor) -> tuple[Tensor, Tensor]:
    """Batch norm as ``(scale, shift)``, each ``[C, 1]``: ``BN(x) = x * scale + shift`` per channel."""
    scale = (weight * rstd)[:, None]
    return scale, bias[:, None] - mean[:, None] * scale


def norm_forward_scan(x_seq: Tensor, residual: Tensor | None, v: Tensor | None, decay: Tensor | float,
                      opts: tuple, surrogate: Any, norm: tuple[Tensor, ...],
                      keep_state: bool = True) -> tuple[Tensor, Tensor | None]:
    """``forward_scan`` of the batch-normed ``x_seq: [T, P, C, Q]``; ``norm`` is
    ``(weight, bias, mean, rstd)``, each ``[C]``. The normalised input is never written."""
    return forward_scan(x_seq, residual, v, decay, opts, surrogate, folded(*norm), keep_state)


def norm_parameter_grads(x_seq: Tensor, residual: Tensor | None, v_init: Tensor | None,
                         grad_spikes: Tensor, grad_v: Tensor | None, decay: Tensor | float, opts: tuple,
                         surrogate: Any, mask: Tensor | None, want_decay: bool,
                         norm: tuple[Tensor, ...]) -> tuple[Tensor, Tensor, Tensor | None, Tensor | None]:
    """Backward through batch norm (batch statistics) and the neuron, first pass, for
    ``x_seq: [T, P, C, Q]``: ``(dL/dweight [C], dL/dbias [C], dL/dv_init or None,
    dL/d(1/tau) or None)``. Reductions only: nothing of ``x_seq``'s size is written."""
    weight, bias, mean, rstd = norm
    grad_y, grad_v0, grad_decay = _input_gradients(x_seq, residual, v_init, grad_spikes, grad_v, decay,
                                                   opts, surrogate, mask, want_decay, folded(*norm))
    grad_bias = grad_weight = torch.zeros_like(weight)
    for g, x in zip(grad_y, x_seq.unbind(0)):
        grad_bias = grad_bias + g.sum((0, 2))
        grad_weight = grad_weight + (g * (x - mean[:, None])).sum((0, 2))
    return grad_weight * rstd, grad_bias, grad_v0, grad_decay


def norm_input_grads(x_seq: Tensor, residual: Tensor | None, v_init: Tensor | None,
                     grad_spikes: Tensor, grad_v: Tensor | None, decay: Tensor | float, opts: tuple,
                     surrogate: Any, mask: Tensor | None, norm: tuple[Tensor, ...],
                     grad_weight: Tensor, grad_bias: Tensor) -> tuple[Tensor, Tensor | None]:
    """Second pass, given the first's parameter gradients: ``(dL/dx [T, P, C, Q], dL/dresidual
    or None)``, PyTorch's batch-norm formula ``dL/dx = scale (g - mean(g) - x_hat mean(g x_hat))``
    with ``x_hat`` and the neuron's gradient ``g`` recomputed rather than stored."""
    weight, bias, mean, rstd = norm
    scale, _ = affine = folded(weight, bias, mean, rstd)
    grad_y, _, _ = _input_gradients(x_seq, residual, v_init, grad_spikes, grad_v, decay, opts, surrogate,
                                    mask, False, affine)
    count = x_seq.numel() // x_seq.shape[2]
    mean_grad, slope = (grad_bias / count)[:, None], (grad_weight * rstd / count)[:, None]
    grad_x = torch.stack([scale * (g - mean_grad - (x - mean[:, None]) * slope)
                          for g, x in zip(grad_y, x_seq.unbind(0))])
    return grad_x, torch.stack(grad_y) if residual is not None else None


class Kernels(NamedTuple):
    """A backend's functions (see their docstrings); ``None`` where the backend has none."""

    forward_scan: Callable
    backward: Callable
    batch_stats: Callable | None
    norm_forward_scan: Callable | None
    norm_parameter_grads: Callable | None
    norm_input_grads: Callable | None


def _compiled(fn: Callable) -> Callable:
    # one graph per (surrogate type, options, dtype): allow more than dynamo's default 8
    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
    return torch.compile(fn)


EAGER = Kernels(forward_scan, backward, batch_stats, norm_forward_scan, norm_parameter_grads,
                norm_input_grads)


@functools.lru_cache(maxsize=None)
def _built(mode: str) -> Kernels:
    if mode == "triton":
        from . import triton_lif  # imports triton: only when this backend runs
        return Kernels(triton_lif.forward_scan, triton_lif.backward, None, None, None, None)
    return Kernels(*map(_compiled, EAGER)) if mode == "fused" else EAGER


def kernels(mode: str) -> Kernels:
    """The functions of a backend: ``eager``, ``fused`` (compiled) or ``triton`` (no folded
    norm); built once per mode, since every layer asks for them in forward and backward.
    Inside ``torch.compile`` (a whole model compiled) the plain functions, which the
    compiler traces into its own graph."""
    return EAGER if torch.compiler.is_compiling() else _built(mode)


class _FusedLIF(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x_seq: Tensor, residual: Tensor | None, v_init: Tensor | None,
                decay: Tensor | float, weight: Tensor | None, bias: Tensor | None,
                stats: tuple[Tensor, Tensor] | None, opts: tuple, surrogate: Any,
                mode: str, keep_state: bool) -> tuple[Tensor, Tensor | None]:
        fns = kernels(mode)
        if stats is None:
            spikes, v_final = fns.forward_scan(x_seq, residual, v_init, decay, opts, surrogate,
                                               keep_state=keep_state)
        else:
            spikes, v_final = fns.norm_forward_scan(x_seq, residual, v_init, decay, opts, surrogate,
                                                    (weight, bias, *stats), keep_state)
        ctx.opts, ctx.surrogate, ctx.mode, ctx.norm = opts, surrogate, mode, stats is not None
        ctx.decay_is_tensor = isinstance(decay, Tensor)
        ctx.decay = None if ctx.decay_is_tensor else decay
        ctx.save_for_backward(x_seq, residual, v_init, decay if ctx.decay_is_tensor else None,
                              weight, bias, *(stats or (None, None)))
        return spikes, v_final

    @staticmethod
    def backward(ctx: Any, grad_spikes: Tensor | None, grad_v: Tensor | None):
        x_seq, residual, v_init, decay_t, *norm = ctx.saved_tensors
        decay = decay_t if ctx.decay_is_tensor else ctx.decay
        surrogate, mask = ctx.surrogate.split_mask(x_seq)  # MSG's mask is drawn here, eagerly
        grad_spikes = torch.zeros_like(x_seq) if grad_spikes is None else grad_spikes
        want_decay = ctx.decay_is_tensor and ctx.needs_input_grad[3]
        fns = kernels(ctx.mode)
        args = (x_seq, residual, v_init, grad_spikes, grad_v, decay, ctx.opts, surrogate, mask)
        grad_weight = grad_bias = None
        if ctx.norm:  # two passes: the parameter gradients, then the input's from them
            norm = tuple(norm)
            grad_weight, grad_bias, grad_v0, grad_decay = fns.norm_parameter_grads(*args, want_decay, norm)
            grad_x, grad_residual = fns.norm_input_grads(*args, norm, grad_weight, grad_bias)
        else:
            grad_x, grad_v0, grad_decay = fns.backward(*args, want_decay)
            grad_residual = grad_x if residual is not None else None
        if grad_decay is not None:
            grad_decay = grad_decay.to(decay_t.dtype)
        return (grad_x, grad_residual, grad_v0, grad_decay, grad_weight, grad_bias, None, None, None, None, None)


def _rows(t: Tensor, order: list[int], channels: bool) -> Tensor:
    """``t: [T, ...]`` as ``[T, N]`` rows in ``order``'s memory layout (a view when it has it);
    with ``channels``, ``t: [T, B, C, ...]`` as ``[T, P, C, Q]`` (P, Q: the dims before and
    after the channel's in memory)."""
    lined = t.permute(order)
    if not channels:
        return lined.reshape(t.shape[0], -1)
    at = order.index(2)
    return lined.reshape(t.shape[0], math.prod(lined.shape[1:at]), t.shape[2], -1)


def _unrows(rows: Tensor, like: Tensor, order: list[int]) -> Tensor:
    """``_rows``' inverse: ``rows`` viewed with ``like``'s shape (and its strides when dense)."""
    inverse = sorted(range(len(order)), key=order.__getitem__)
    return rows.view([like.shape[d] for d in order]).permute(inverse)


def lif(x_seq: Tensor, v_init: Tensor | None, decay: Tensor | float, decay_input: bool,
        v_threshold: float, v_reset: float | None, detach_reset: bool, surrogate: Any,
        mode: str = "fused", residual: Tensor | None = None, norm: Any = None,
        keep_state: bool = True) -> tuple[Tensor, Tensor | None]:
    """Fused LIF over the input ``x_seq (+ residual)``, ``[T, B, ...]``, from ``v_init: [B, ...]``
    (None: resting); returns ``(spikes [T, B, ...], v_final [B, ...])`` (``v_final`` None,
    and never computed, unless ``keep_state``). The residual is
    added inside, so the sum is never stored: backward keeps ``x_seq`` and ``residual``,
    which the layers before it keep anyway. ``mode``: ``"fused"`` (compiled), ``"eager"``
    or ``"triton"``.

    ``norm`` (``eager``/``fused``, not inside ``torch.compile``): a training-mode batch
    norm over ``x_seq: [T, B, C, ...]``'s channels, folded into the loop (the normalised
    input is never written, and backward keeps ``x_seq`` instead). It is any object with
    ``weight``, ``bias`` (``[C]``), ``eps`` and ``record(mean, var, count)``, which is
    handed the batch statistics (``memory.BatchNorm2d``).

    The kernels see every tensor as ``[T, N]`` rows (``[T, P, C, Q]`` with ``norm``) in
    ``x_seq``'s memory layout (channels-last included, without a copy); the spikes come
    back in that layout. Inside ``torch.compile`` the tensors go in as they are."""
    opts = (decay_input, v_threshold, v_reset, detach_reset)
    if torch.compiler.is_compiling():  # inductor plans its own loops; rows would add symbolic reshapes
        return _FusedLIF.apply(x_seq, residual, v_init, decay, None, None, None, opts, surrogate, mode,
                               keep_state)
    order = memory_order(x_seq) or list(range(x_seq.dim()))
    channels = norm is not None
    rows = _rows(x_seq, order, channels)
    weight = bias = stats = None
    if norm is not None:
        with torch.no_grad():
            mean, var, rstd = kernels(mode).batch_stats(rows.detach(), norm.eps)
        norm.record(mean, var, rows.numel() // rows.shape[2])
        weight, bias, stats = norm.weight, norm.bias, (mean, rstd)
    spikes, v_final = _FusedLIF.apply(
        rows, None if residual is None else _rows(residual, order, channels),
        None if v_init is None else _rows(v_init.unsqueeze(0), order, channels)[0], decay,
        weight, bias, stats, opts, surrogate, mode, keep_state)
    v_final = None if v_final is None else _unrows(v_final.unsqueeze(0), x_seq[:1], order)[0]
    return _unrows(spikes, x_seq, order), v_final

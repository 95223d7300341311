"""The fused multi-step LIF in plain torch: one loop over T forward, one reverse loop back.

These functions are what the operator ``torch.ops.spikegrad.lif`` (``kernels.lif``)
runs on CPU, compiled by ``torch.compile`` (backend ``"fused"``) or as they are
(``"eager"``: no compiler, for debugging and platforms without one). They see every
tensor as ``[T, N]`` rows (``[T, P, C, Q]`` with a folded batch norm, ``C`` its channels).

Forward runs the loop over T; the operator saves only its input ``x: [T, ...]`` (and
``v_init`` when one is given; the default resting membrane is rebuilt). A batch norm
before the neuron is, in training, folded into the loop (``norm_forward_scan``): the
neuron takes the batch statistics, normalises each step on the fly and keeps the
un-normalised input, so the normalised tensor is never written; its backward is
PyTorch's batch-norm formula with ``x_hat`` rebuilt on the fly.
Backward recomputes the pre-spike membranes ``h[t]`` from ``x`` and runs one reverse
loop over T: ``dL/dh[t] = dL/ds[t] * g[t] + dv/dh[t] * dL/dv[t]``, where
``g = surrogate.grad(h - v_th)`` (so any surrogate, Dspike's temperature and AdaLi's
bounds included, runs on every backend; MSG's mask is drawn eagerly from its own
generator and passed in), ``dv/dh`` is the reset's derivative and
``dL/dv[t] = (1 - 1/tau) * dL/dh[t+1]``. Membranes and derivatives stay per step, never
stacked: compiled, each half is one loop over the neurons with the T steps in
registers, which reads the input once and writes only its outputs.

``opts`` below is ``(decay_input, v_threshold, v_reset, detach_reset)``. ``KernelSet``
is the interface every backend implements (``torch_kernels`` for these functions,
``kernels.triton_lif.KERNELS`` for Triton, which shares ``slopes`` and
``decay_gradient``). This module imports nothing but torch.
"""
from __future__ import annotations

from typing import Any, Callable, NamedTuple, Sequence

import torch
from torch import Tensor

__all__ = ["charge", "reset", "resting", "steps", "membranes", "forward_scan", "slopes",
           "decay_gradient", "backward", "batch_stats", "folded", "normalised", "norm_forward_scan",
           "norm_parameter_grads", "norm_input_grads", "norm_backward_unfused", "KernelSet",
           "torch_kernels"]


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

def batch_stats(x_seq: Tensor) -> tuple[Tensor, Tensor]:
    """Per-channel ``(mean, biased var)``, each ``[C]``, of ``x_seq: [T, P, C, Q]``."""
    var, mean = torch.var_mean(x_seq, dim=(0, 1, 3), correction=0)
    return mean, var


def folded(weight: Tensor, bias: Tensor, mean: Tensor, rstd: Tensor) -> tuple[Tensor, Tensor]:
    """Batch norm as ``(scale, shift)``, each ``[C, 1]``: ``BN(x) = x * scale + shift`` per channel."""
    scale = (weight * rstd)[:, None]
    return scale, bias[:, None] - mean[:, None] * scale


def normalised(x_seq: Tensor, norm: tuple[Tensor, ...]) -> Tensor:
    """``x_seq: [T, P, C, Q]`` batch-normed with ``norm = (weight, bias, mean, rstd)``, written out
    (for kernels that do not fold the norm into their loop)."""
    scale, shift = folded(*norm)
    return torch.addcmul(shift, x_seq, scale)


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




def norm_backward_unfused(backward: Callable, x_seq: Tensor, residual: Tensor | None,
                          v_init: Tensor | None, grad_spikes: Tensor, grad_v: Tensor | None,
                          decay: Tensor | float, opts: tuple, surrogate: Any, mask: Tensor | None,
                          want_decay: bool, norm: tuple[Tensor, ...]) -> tuple:
    """The folded batch norm's backward around a ``backward`` without one (Triton's): that
    backward runs on the normalised input (written out), then PyTorch's batch-norm formula.
    Returns ``(dL/dx, dL/dresidual or None, dL/dv_init or None, dL/d(1/tau) or None,
    dL/dweight, dL/dbias)``."""
    weight, bias, mean, rstd = norm
    grad_y, grad_v0, grad_decay = backward(normalised(x_seq, norm), residual, v_init, grad_spikes,
                                           grad_v, decay, opts, surrogate, mask, want_decay)
    x_hat = (x_seq - mean[:, None]) * rstd[:, None]
    grad_bias, grad_weight = grad_y.sum((0, 1, 3)), (grad_y * x_hat).sum((0, 1, 3))
    count = x_seq.numel() // x_seq.shape[2]
    scale = (weight * rstd)[:, None]
    grad_x = scale * (grad_y - (grad_bias / count)[:, None] - x_hat * (grad_weight / count)[:, None])
    return grad_x, grad_y if residual is not None else None, grad_v0, grad_decay, grad_weight, grad_bias


class KernelSet(NamedTuple):
    """What a backend of the operator provides, on ``[T, N]`` rows (``[T, P, C, Q]`` with a norm).

    - ``forward(x, residual, v_init, decay, opts, surrogate, norm, keep_state)`` ->
      ``(spikes, v_final or None)``; ``norm`` None or ``(weight, bias, mean, rstd)``;
    - ``backward(x, residual, v_init, grad_spikes, grad_v, decay, opts, surrogate, mask,
      want_decay, norm)`` -> ``(dL/dx, dL/dresidual, dL/dv_init, dL/d(1/tau), dL/dweight,
      dL/dbias)``, None where there is no such input or gradient;
    - ``batch_stats(x)`` -> ``(mean, biased var)`` per channel;
    - ``supports(x, surrogate)``: whether it runs this input (else ``"fused"`` does).
    """

    forward: Callable
    backward: Callable
    batch_stats: Callable
    supports: Callable[[Tensor, Any], bool]


def torch_kernels(compile_fn: Callable[[Callable], Callable] = lambda fn: fn) -> KernelSet:
    """The kernel set of this module's functions, each passed through ``compile_fn``."""
    scan, back, stats, norm_scan, norm_params, norm_inputs = map(compile_fn, (
        forward_scan, backward, batch_stats, norm_forward_scan, norm_parameter_grads, norm_input_grads))

    def forward_(x_seq, residual, v_init, decay, opts, surrogate, norm, keep_state):
        if norm is None:
            return scan(x_seq, residual, v_init, decay, opts, surrogate, keep_state=keep_state)
        return norm_scan(x_seq, residual, v_init, decay, opts, surrogate, norm, keep_state)

    def backward_(x_seq, residual, v_init, grad_spikes, grad_v, decay, opts, surrogate, mask,
                  want_decay, norm):
        args = (x_seq, residual, v_init, grad_spikes, grad_v, decay, opts, surrogate, mask)
        if norm is None:
            grad_x, grad_v0, grad_decay = back(*args, want_decay)
            return grad_x, grad_x if residual is not None else None, grad_v0, grad_decay, None, None
        # two passes: the parameter gradients (reductions only), then the input's from them
        grad_weight, grad_bias, grad_v0, grad_decay = norm_params(*args, want_decay, norm)
        grad_x, grad_residual = norm_inputs(*args, norm, grad_weight, grad_bias)
        return grad_x, grad_residual, grad_v0, grad_decay, grad_weight, grad_bias

    return KernelSet(forward_, backward_, stats, lambda x_seq, surrogate: True)

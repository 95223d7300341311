"""Triton kernels for the multi-step LIF on CUDA: the two time scans of ``kernels.fused``.

Backend ``"triton"`` (what the operator ``torch.ops.spikegrad.lif`` runs for CUDA
tensors when triton is installed) runs the same algorithm as ``"fused"`` with the loops
over T written as Triton kernels, one program per block of neurons with the membrane in
registers:

- ``forward_scan``: spikes and the final membrane from ``x (+ residual)``;
- ``membranes``: the same kernel writing the pre-spike membranes ``h`` (backward
  recomputes them, as ``fused`` does);
- ``backward_scan``: ``g[t] = a[t] + c[t] g[t+1]`` in reverse time;
- ``backward``: ``fused.backward``'s gradients from those two scans.

The surrogate derivative between the two backward scans stays in torch
(``fused.slopes`` on the whole ``[T, ...]``), so every surrogate (Dspike's temperature,
AdaLi's bounds, MSG's mask) works unchanged. Inputs
are computed in float32 (float16/bfloat16 are loaded and stored in their own dtype);
float64 and non-spiking surrogates run ``"fused"`` instead (``KERNELS.supports``). A
folded batch norm is applied before the forward kernel (its output written) and
differentiated in torch (``fused.norm_backward_unfused``).
This module imports triton; ``spikegrad`` imports it only when the backend is used
(``kernels.lif``), and it imports only ``kernels.fused`` of spikegrad.
Tested on CPU tensors under Triton's interpreter (``TRITON_INTERPRET=1``).
"""
from __future__ import annotations

from typing import Any

import torch
import triton
import triton.language as tl
from torch import Tensor

from .fused import KernelSet, batch_stats, decay_gradient, norm_backward_unfused, normalised, slopes

__all__ = ["forward_scan", "membranes", "backward_scan", "backward", "DTYPES", "KERNELS"]

BLOCK = 256
DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@triton.jit
def _lif_kernel(x_ptr, r_ptr, v0_ptr, decay_ptr, keep_ptr, s_ptr, h_ptr, vT_ptr, T, N,
                v_threshold, rest,
                HAS_RESIDUAL: tl.constexpr, HAS_V0: tl.constexpr, DECAY_INPUT: tl.constexpr,
                SOFT: tl.constexpr, WRITE_H: tl.constexpr, BLOCK_N: tl.constexpr):
    offs = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    inside = offs < N
    decay = tl.load(decay_ptr).to(tl.float32)
    keep = tl.load(keep_ptr).to(tl.float32)
    if HAS_V0:
        v = tl.load(v0_ptr + offs, mask=inside, other=0.0).to(tl.float32)
    else:
        v = tl.zeros([BLOCK_N], dtype=tl.float32) + rest
    for t in range(T):
        x = tl.load(x_ptr + t * N + offs, mask=inside, other=0.0).to(tl.float32)
        if HAS_RESIDUAL:
            x = x + tl.load(r_ptr + t * N + offs, mask=inside, other=0.0).to(tl.float32)
        if DECAY_INPUT:
            h = v * keep + decay * (x + rest)
        else:
            h = v * keep + (x + decay * rest)
        s = (h - v_threshold >= 0).to(tl.float32)
        if SOFT:
            v = h - v_threshold * s
        else:
            v = h * (1 - s) + rest * s  # hard reset: to v_reset, which is rest
        if WRITE_H:
            tl.store(h_ptr + t * N + offs, h.to(h_ptr.dtype.element_ty), mask=inside)
        else:
            tl.store(s_ptr + t * N + offs, s.to(s_ptr.dtype.element_ty), mask=inside)
    tl.store(vT_ptr + offs, v.to(vT_ptr.dtype.element_ty), mask=inside)


@triton.jit
def _reverse_scan_kernel(a_ptr, c_ptr, last_ptr, g_ptr, T, N, BLOCK_N: tl.constexpr):
    offs = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    inside = offs < N
    g = tl.load(last_ptr + offs, mask=inside, other=0.0).to(tl.float32)
    for i in range(T):
        t = T - 1 - i
        a = tl.load(a_ptr + t * N + offs, mask=inside, other=0.0).to(tl.float32)
        if i == 0:
            g = a + g
        else:
            g = a + tl.load(c_ptr + t * N + offs, mask=inside, other=0.0).to(tl.float32) * g
        tl.store(g_ptr + t * N + offs, g.to(g_ptr.dtype.element_ty), mask=inside)


def _scalar(value: Tensor | float, like: Tensor) -> Tensor:
    """A one-element float32 tensor on ``like``'s device (no host sync for tensors)."""
    if isinstance(value, Tensor):
        return value.detach().reshape(1).to(device=like.device, dtype=torch.float32)
    return torch.tensor([value], dtype=torch.float32, device=like.device)


def _run(x_seq: Tensor, residual: Tensor | None, v: Tensor | None, decay: Tensor | float,
         opts: tuple, write_h: bool) -> tuple[Tensor, Tensor]:
    decay_input, v_threshold, v_reset, _ = opts
    x_seq = x_seq.contiguous()
    T, N = x_seq.shape[0], x_seq[0].numel()
    out = torch.empty_like(x_seq)
    v_final = torch.empty_like(x_seq[0])
    keep = 1.0 - decay
    _lif_kernel[(triton.cdiv(N, BLOCK),)](
        x_seq, x_seq if residual is None else residual.contiguous(),
        x_seq if v is None else v.contiguous(), _scalar(decay, x_seq), _scalar(keep, x_seq),
        out, out, v_final, T, N, float(v_threshold), 0.0 if v_reset is None else float(v_reset),
        HAS_RESIDUAL=residual is not None, HAS_V0=v is not None, DECAY_INPUT=bool(decay_input),
        SOFT=v_reset is None, WRITE_H=write_h, BLOCK_N=BLOCK)
    return out, v_final


def forward_scan(x_seq: Tensor, residual: Tensor | None, v: Tensor | None, decay: Tensor | float,
                 opts: tuple, surrogate: Any, keep_state: bool = True) -> tuple[Tensor, Tensor | None]:
    """As ``fused.forward_scan``: ``(spikes [T, ...], v_final [...] or None)``."""
    spikes, v_final = _run(x_seq, residual, v, decay, opts, write_h=False)
    return spikes, v_final if keep_state else None


def membranes(x_seq: Tensor, residual: Tensor | None, v: Tensor | None, decay: Tensor | float,
              opts: tuple, surrogate: Any) -> tuple[Tensor, Tensor]:
    """As ``fused.membranes``, the membranes as one tensor: ``(h_seq [T, ...], v_final [...])``."""
    return _run(x_seq, residual, v, decay, opts, write_h=True)


def backward_scan(a: Tensor, c: Tensor, last: Tensor) -> Tensor:
    """``g[t] = a[t] + c[t] g[t+1]``, ``g[T-1] = a[T-1] + last``."""
    a, c = a.contiguous(), c.contiguous()
    T, N = a.shape[0], a[0].numel()
    g = torch.empty_like(a)
    _reverse_scan_kernel[(triton.cdiv(N, BLOCK),)](a, c, last.contiguous(), g, T, N, BLOCK_N=BLOCK)
    return g


def backward(x_seq: Tensor, residual: Tensor | None, v_init: Tensor | None, grad_spikes: Tensor,
             grad_v: Tensor | None, decay: Tensor | float, opts: tuple, surrogate: Any,
             mask: Tensor | None, want_decay: bool) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """As ``fused.backward``: ``(dL/dx [T, ...], dL/dv_init [...] or None, dL/d(1/tau) or
    None)``, the derivatives on all of ``[T, ...]`` at once between the two scans."""
    h_seq, _ = membranes(x_seq, residual, v_init, decay, opts, surrogate)
    g, dv_dh = slopes(h_seq, mask, opts, surrogate)
    keep = 1.0 - decay
    last = torch.zeros_like(h_seq[-1]) if grad_v is None else dv_dh[-1] * grad_v
    grad_h = backward_scan(grad_spikes * g, keep * dv_dh, last)
    grad_decay = (decay_gradient(grad_h, h_seq, x_seq, residual, v_init, opts, surrogate)
                  if want_decay else None)
    grad_v0 = None if v_init is None else grad_h[0] * keep
    return grad_h * decay if opts[0] else grad_h, grad_v0, grad_decay


def _forward(x_seq, residual, v_init, decay, opts, surrogate, norm, keep_state):
    x_seq = x_seq if norm is None else normalised(x_seq, norm)
    return forward_scan(x_seq, residual, v_init, decay, opts, surrogate, keep_state)


def _backward(x_seq, residual, v_init, grad_spikes, grad_v, decay, opts, surrogate, mask, want_decay, norm):
    if norm is not None:
        return norm_backward_unfused(backward, x_seq, residual, v_init, grad_spikes, grad_v, decay, opts,
                                     surrogate, mask, want_decay, norm)
    grad_x, grad_v0, grad_decay = backward(x_seq, residual, v_init, grad_spikes, grad_v, decay, opts,
                                           surrogate, mask, want_decay)
    return grad_x, grad_x if residual is not None else None, grad_v0, grad_decay, None, None


KERNELS = KernelSet(_forward, _backward, batch_stats,
                    lambda x_seq, surrogate: surrogate.spiking and x_seq.dtype in DTYPES)

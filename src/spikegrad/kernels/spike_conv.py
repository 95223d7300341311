"""Convolutions whose input is a spike tensor, on the CPU: cost in proportion to the spikes.

A spiking network's convolutions (all but the first) take 0/1 inputs. Two of a
convolution's three products then reduce to sums over the active inputs: the forward
output is a sum of weight rows, the weight gradient a sum of output-gradient rows. This
module runs those two by gather-and-accumulate over lists of the active inputs
(``spike_conv.cpp``, built on first use with the system's C++ compiler and loaded with
ctypes); the input gradient, whose input is the dense output gradient, stays with oneDNN.

    out = conv2d(spikes, weight, bias, stride, padding, dilation, plan=Plan(True, True))

Results agree with the dense convolution to float32 rounding (the same products, summed
in another order; the forward sum of 0/1-weighted weights is exact per term) and are
deterministic whatever the thread count. ``plan_for`` decides per call, from the spike
density and the layer's shape, which of the two products take this path
(``MAX_DENSITY``, measured per CPU kind: docs/performance.md, "Spike-aware
convolutions"); ``layers.Conv2d`` asks it for every input a neuron marked as spikes.
"""
from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import warnings
from pathlib import Path
from typing import Any, NamedTuple, Sequence

import torch
from torch import Tensor
from torch.nn import functional as F

from .. import memory

__all__ = ["MODES", "MAX_DENSITY", "MIN_CHANNELS", "Plan", "library", "available", "spike_count", "forward",
           "weight_grad", "eligible", "limits_for", "plan_for", "conv2d"]

MODES = ("auto", "on", "off")  # layers.Conv2d.spike_conv: the rule, always (spike inputs), never

# Largest spike density at which each product beats oneDNN's dense one, by CPU kind
# (layers.cpu_kind), for kernels larger than 1x1 with at least MIN_CHANNELS input and
# output channels; narrower or 1x1 convolutions are cheap for oneDNN and stay dense.
# Measured with `spikegrad bench spikes` on ResNet-18's convolutions (docs/performance.md,
# "Spike-aware convolutions"); AVX-512 hosts are not measured yet, so they stay dense.
MAX_DENSITY = {"avx2": {"forward": 0.25, "weight": 0.25}, "avx512": {"forward": 0.0, "weight": 0.0},
               "other": {"forward": 0.0, "weight": 0.0}}
MIN_CHANNELS = 32

_SOURCE = Path(__file__).with_name("spike_conv.cpp")
_FLAGS = ("-O3", "-std=c++17", "-shared", "-fPIC", "-pthread")


class Plan(NamedTuple):
    """Which products of one convolution run on the spike lists: ``forward`` (the output)
    and ``weight`` (the weight gradient); the input gradient is always dense."""

    forward: bool
    weight: bool


def _cache_dir() -> Path:
    root = os.environ.get("SPIKEGRAD_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "spikegrad")
    return Path(root)


def _host_id() -> str:
    """What ``-march=native`` compiles for: the machine and (Linux) the CPU's feature flags."""
    flags = ""
    try:
        with open("/proc/cpuinfo") as info:
            flags = next((line for line in info if line.startswith(("flags", "Features"))), "")
    except OSError:
        pass
    return platform.machine() + flags


def _compile(compiler: str, output: Path) -> bool:
    """Compiles the kernels into ``output``: tuned for this CPU (``-march=native``) and
    threaded by OpenMP (``-fopenmp``: PyTorch's own libgomp, already loaded), each dropped
    if the compiler refuses it. True on success."""
    for extra in (["-march=native", "-fopenmp"], ["-fopenmp"], ["-march=native"], []):
        result = subprocess.run([compiler, *_FLAGS, *extra, str(_SOURCE), "-o", str(output)],
                                capture_output=True, text=True)
        if result.returncode == 0:
            return True
    last = (result.stderr.strip().splitlines() or ["no output"])[-1]
    warnings.warn(f"spikegrad: could not build the spike-aware convolutions with {compiler} ({last}); "
                  f"convolutions stay dense", stacklevel=3)
    return False


@functools.lru_cache(maxsize=None)
def library() -> ctypes.CDLL | None:
    """The compiled kernels (built once per source, compiler and CPU into
    ``$SPIKEGRAD_CACHE_DIR``, default ``~/.cache/spikegrad``), or None without a C++
    compiler (``$CXX``, ``c++`` or ``g++``) or on a failed build (one warning)."""
    compiler = os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++")
    if compiler is None or sys.platform == "win32":
        return None
    try:
        version = subprocess.run([compiler, "--version"], capture_output=True, text=True).stdout
    except OSError:
        return None
    key = hashlib.sha256(b"\0".join(x.encode() for x in (_SOURCE.read_text(), compiler, version,
                                                           " ".join(_FLAGS), _host_id()))).hexdigest()[:16]
    path = _cache_dir() / f"spike_conv-{key}.so"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=path.parent) as tmp:  # build beside, then rename: atomic
            built = Path(tmp) / path.name
            if not _compile(compiler, built):
                return None
            os.replace(built, path)
    return _load(path)


def _load(path: Path) -> ctypes.CDLL:
    """The built kernels at ``path``, their C signatures declared."""
    lib = ctypes.CDLL(str(path))
    for name in ("spike_conv_forward", "spike_conv_weight_grad"):
        getattr(lib, name).restype = None
        getattr(lib, name).argtypes = [ctypes.c_void_p] * 4 + [ctypes.c_int]
    lib.spike_count.restype = ctypes.c_int64
    lib.spike_count.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_int]
    return lib


def available() -> bool:
    """Whether the spike-aware kernels can run here (a C++ compiler built them)."""
    return library() is not None


def _lib() -> ctypes.CDLL:
    lib = library()
    if lib is None:
        raise RuntimeError("spike-aware convolutions need a C++ compiler ($CXX, c++ or g++) to build their "
                           "kernels; none worked here: use spike_conv 'auto' or 'off'")
    return lib


def _pair(v: int | Sequence[int]) -> tuple[int, int]:
    return (v, v) if isinstance(v, int) else (int(v[0]), int(v[1]))


def _geometry(spikes: Tensor, weight: Tensor, out_hw: Sequence[int], stride: Any, padding: Any,
              dilation: Any) -> Tensor:
    """The kernels' ``int64[19]``: N, H, W, C, Co, OH, OW, KH, KW, stride, padding,
    dilation, and the strides of ``weight`` (the weight or its gradient, ``[Co, C, KH, KW]``)."""
    N, C, H, W = spikes.shape
    Co, _, KH, KW = weight.shape
    return torch.tensor([N, H, W, C, Co, *out_hw, KH, KW, *_pair(stride), *_pair(padding), *_pair(dilation),
                         *weight.stride()], dtype=torch.int64)


def _output_hw(spikes: Tensor, weight_shape: Sequence[int], stride: Any, padding: Any,
               dilation: Any) -> tuple[int, int]:
    sizes = []
    for size, k, s, p, d in zip(spikes.shape[-2:], weight_shape[-2:], _pair(stride), _pair(padding), _pair(dilation)):
        sizes.append((size + 2 * p - d * (k - 1) - 1) // s + 1)
    return sizes[0], sizes[1]


def _channels_last(t: Tensor) -> Tensor:
    return t.contiguous(memory_format=torch.channels_last)


def spike_count(spikes: Tensor) -> int:
    """The number of nonzero values of a float32 tensor (any shape and layout)."""
    flat = spikes if memory.memory_order(spikes) is not None else spikes.contiguous()
    return int(_lib().spike_count(flat.data_ptr(), flat.numel(), torch.get_num_threads()))


def forward(spikes: Tensor, weight: Tensor, stride: Any = 1, padding: Any = 0, dilation: Any = 1) -> Tensor:
    """``F.conv2d(spikes, weight, None, stride, padding, dilation)`` by summing weight rows
    at the active inputs. ``spikes: [N, C, H, W]`` float32 of 0/1 (any value other than 0
    counts as 1), ``weight: [C_out, C, KH, KW]`` (any strides) -> ``[N, C_out, OH, OW]``,
    channels-last."""
    spikes = _channels_last(spikes)
    out_hw = _output_hw(spikes, weight.shape, stride, padding, dilation)
    geometry = _geometry(spikes, weight, out_hw, stride, padding, dilation)
    out = torch.empty((spikes.shape[0], weight.shape[0], *out_hw), memory_format=torch.channels_last)
    _lib().spike_conv_forward(spikes.data_ptr(), weight.detach().data_ptr(), out.data_ptr(), geometry.data_ptr(),
                              torch.get_num_threads())
    return out


def weight_grad(spikes: Tensor, grad_out: Tensor, weight_shape: Sequence[int], stride: Any = 1,
                padding: Any = 0, dilation: Any = 1, like: Tensor | None = None) -> Tensor:
    """The weight gradient of ``conv2d(spikes, weight)`` for the output gradient ``grad_out``,
    by summing output-gradient rows at the active inputs. ``spikes: [N, C, H, W]`` 0/1,
    ``grad_out: [N, C_out, OH, OW]``, both float32 -> ``[C_out, C, KH, KW]``, laid out as
    ``like`` (the weight: what its gradient accumulates into without a copy) or contiguous."""
    spikes, grad_out = _channels_last(spikes), _channels_last(grad_out)
    out = torch.empty(tuple(weight_shape)) if like is None else torch.empty_like(like)
    geometry = _geometry(spikes, out, grad_out.shape[-2:], stride, padding, dilation)
    _lib().spike_conv_weight_grad(spikes.data_ptr(), grad_out.data_ptr(), out.data_ptr(), geometry.data_ptr(),
                                  torch.get_num_threads())
    return out


def _fits(spikes: Tensor) -> bool:
    """Within the kernels' index types: channels in 16 bits, sides in 15, pixels in 31."""
    N, C, H, W = spikes.shape
    return C < 2**16 and max(H, W) < 2**15 and N * H * W < 2**31


def eligible(kernel: tuple[int, int], c_in: int, c_out: int) -> bool:
    """Whether ``auto`` may send a convolution to the spike path at all: a kernel larger
    than 1x1 and at least ``MIN_CHANNELS`` input and output channels."""
    return tuple(kernel) != (1, 1) and min(c_in, c_out) >= MIN_CHANNELS


def limits_for(kind: str) -> dict[str, float]:
    """``MAX_DENSITY`` of CPU kind ``kind`` (``"other"``'s for a kind not listed)."""
    return MAX_DENSITY.get(kind, MAX_DENSITY["other"])


def plan_for(spikes: Tensor, weight: Tensor, mode: str, kind: str) -> Plan | None:
    """Which products of ``conv2d(spikes, weight)`` take the spike path, or None for none.

    ``spikes: [N, C, H, W]`` must be 0/1 (the caller knows: a neuron marked them).
    ``mode``: ``"on"`` both products; ``"off"`` none; ``"auto"`` each where this CPU kind's
    measured ``MAX_DENSITY`` allows at the input's density, for kernels larger than 1x1
    with at least ``MIN_CHANNELS`` input and output channels. float32 only, sizes within the
    kernels' index types; never without the compiled kernels (``"on"`` then raises)."""
    if mode not in MODES:
        raise ValueError(f"spike_conv must be one of {', '.join(MODES)}, got {mode!r}")
    if mode == "off" or spikes.dtype != torch.float32 or weight.dtype != torch.float32 or not _fits(spikes):
        return None
    if mode == "on":
        _lib()
        return Plan(True, True)
    limits = limits_for(kind)
    if not eligible(weight.shape[-2:], weight.shape[1], weight.shape[0]) or max(limits.values()) <= 0 \
            or not available():
        return None
    density = spike_count(spikes) / max(1, spikes.numel())
    plan = Plan(density <= limits["forward"], density <= limits["weight"])
    return plan if plan.forward or plan.weight else None


class _SpikeConv(torch.autograd.Function):
    """``conv2d`` with the products ``plan`` names on the spike lists, the rest dense."""

    @staticmethod
    def forward(ctx: Any, spikes: Tensor, weight: Tensor, bias: Tensor | None, stride: Any, padding: Any,
                dilation: Any, plan: Plan) -> Tensor:
        if plan.forward:
            out = forward(spikes, weight, stride, padding, dilation)
            if bias is not None:
                out += bias.view(1, -1, 1, 1)
        else:
            out = F.conv2d(spikes, weight, bias, stride, padding, dilation)
        ctx.save_for_backward(spikes, weight)
        ctx.options = (stride, padding, dilation, plan, bias is not None)
        return out

    @staticmethod
    def backward(ctx: Any, grad: Tensor):
        spikes, weight = ctx.saved_tensors
        stride, padding, dilation, plan, has_bias = ctx.options
        sparse_weight = plan.weight and ctx.needs_input_grad[1]
        mask = [ctx.needs_input_grad[0], ctx.needs_input_grad[1] and not sparse_weight, False]
        grad_spikes, grad_weight = None, None
        if any(mask):
            grad_spikes, grad_weight, _ = torch.ops.aten.convolution_backward(
                grad, spikes, weight, None, list(_pair(stride)), list(_pair(padding)), list(_pair(dilation)),
                False, [0, 0], 1, mask)
        if sparse_weight:
            grad_weight = weight_grad(spikes, grad, weight.shape, stride, padding, dilation, like=weight)
        grad_bias = grad.sum((0, 2, 3)) if has_bias and ctx.needs_input_grad[2] else None
        return grad_spikes, grad_weight, grad_bias, None, None, None, None


def conv2d(spikes: Tensor, weight: Tensor, bias: Tensor | None, stride: Any, padding: Any, dilation: Any,
           plan: Plan) -> Tensor:
    """``F.conv2d(spikes, weight, bias, stride, padding, dilation)`` (groups 1, zero padding)
    for a 0/1 input, the products ``plan`` names computed from the active inputs;
    differentiable in all three. ``[N, C, H, W]`` -> ``[N, C_out, OH, OW]`` (channels-last
    when ``plan.forward``). The spikes are laid out channels-last once, for both kernels
    (a marked copy, still saved for backward as bits: ``memory.relayout``)."""
    spikes = memory.relayout(spikes, torch.channels_last)
    return _SpikeConv.apply(spikes, weight, bias, stride, padding, dilation, plan)

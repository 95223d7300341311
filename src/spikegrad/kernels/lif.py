"""The fused multi-step LIF as one PyTorch operator: ``torch.ops.spikegrad.lif``.

    spikes, v_final, norm_mean, norm_var = torch.ops.spikegrad.lif(
        x, residual, v_init, decay, norm_weight, norm_bias, fixed_decay=0.5,
        decay_input=False, v_threshold=1.0, v_reset=0.0, detach_reset=False,
        surrogate=surrogate_handle(sg), norm_eps=1e-5, keep_state=True,
        mark_spikes=True, backend="auto")

Inputs (``[T, B, ...]``, any dense memory layout, channels-last included, which the
spikes and gradients keep): ``x``; ``residual`` (same shape, or None) added to the
input inside the loop, so the sum is never stored; ``v_init`` (``[B, ...]``, or None:
the resting membrane); ``decay`` (a 0-dim learnable ``1/tau``, PLIF's, or None:
``fixed_decay`` is used); ``norm_weight``/``norm_bias`` (``[C]``, or None): a
training-mode batch norm over ``x``'s channels (dim 2) folded into the loop: the
operator computes the batch statistics (returned as ``norm_mean`` and the biased
``norm_var``, ``[C]``, for the caller's running statistics), normalises each step on the
fly and never writes the normalised tensor. ``v_final`` and the statistics are empty
tensors when not asked for (``keep_state=False``, no norm). With ``mark_spikes`` the
spikes are declared 0/1 to ``memory.saved_tensors`` (kept bit-packed when a later layer
saves them). ``surrogate`` is ``surrogate_handle(s)`` of the live surrogate object: its
forward (Heaviside, or the smooth primitive when not spiking) and, in backward, its
derivative over the whole ``[T, N]`` in plain torch (Dspike's temperature, AdaLi's bounds
and MSG's mask as they are at that moment).

Backward is registered (``register_autograd``) as a second operator,
``torch.ops.spikegrad.lif_backward``: it recomputes the membranes from the saved inputs
(nothing of the neuron's own is saved) and runs one reverse-time scan. Both have fake
implementations, so ``torch.compile`` traces a whole model through them without a
graph break.

Which loops run is chosen by registration: the operator's default implementation
(CPU and any device without its own) runs ``kernels.fused`` compiled by
``torch.compile``; the CUDA one runs Triton (``kernels.triton_lif``) when triton is
installed. ``backend`` names a kernel set explicitly (``KERNELS``: ``"eager"``, ``"fused"``,
``"triton"``) or is ``"auto"``, the device's own (on CPU, ``AUTO`` decides when the
compiled loops take over from the eager ones). The neurons call ``run``, which is this
operator under ``torch.compile`` and, in eager mode, the same forward and backward as one
``autograd.Function``.
"""
from __future__ import annotations

import functools
import importlib
import math
import os
import sys
import time
import weakref
from typing import Any, Callable, Optional

import torch
from torch import Tensor

from .. import memory
from . import fused
from .fused import KernelSet

__all__ = ["lif", "lif_backward", "KERNELS", "kernel_set", "surrogate_handle", "triton_installed",
           "RECOMPILE_LIMIT", "AutoKernels", "AUTO", "run"]

RECOMPILE_LIMIT = 64  # graphs per compiled kernel: one per surrogate type, options and dtype


# --- the surrogate: a live object, handed to the operator by name ---------------------------------

_SURROGATES: "weakref.WeakValueDictionary[str, Any]" = weakref.WeakValueDictionary()


def surrogate_handle(surrogate: Any) -> str:
    """The operator's name for a live ``surrogate`` object (held weakly): type and identity.
    Under ``torch.compile`` it is a constant of the graph."""
    key = f"{type(surrogate).__qualname__}@{id(surrogate):x}"
    _SURROGATES[key] = surrogate
    return key


# what torch.compiler.assume_constant_result does, without importing dynamo (and with it
# triton) when spikegrad is imported: dynamo calls it while tracing and keeps the result
surrogate_handle._dynamo_marked_constant = True  # type: ignore[attr-defined]


def _surrogate(handle: str) -> Any:
    surrogate = _SURROGATES.get(handle)
    if surrogate is None:
        raise ValueError(f"spikegrad::lif: no live surrogate {handle!r}; pass surrogate_handle(s)")
    return surrogate


# --- kernel sets ------------------------------------------------------------------------------

def triton_installed() -> bool:
    """Whether the triton package can be found (not imported)."""
    return importlib.util.find_spec("triton") is not None


def _plain(arg: Any) -> Any:
    """``arg`` with every tensor in it detached: no view base, no parameter (dynamo guards
    on a view's base and keeps a parameter's shape static, either of which would compile
    one graph per layer)."""
    if isinstance(arg, Tensor):
        return arg.detach()
    return type(arg)(map(_plain, arg)) if isinstance(arg, tuple) else arg


def _compiled(fn: Callable) -> Callable:
    """``torch.compile(fn, dynamic=True)``: one graph for every layer's shape, batch size
    and T (dimensions of size 1 and each surrogate, option and dtype still get their own).
    Run with a recompile limit of at least ``RECOMPILE_LIMIT`` (dynamo's default of 8 is
    too few for those) and without duck sizing (equal sizes by chance would specialise a
    graph), for its own frames only: the process's settings are restored after each call."""
    compiled = torch.compile(fn, dynamic=True)
    from torch._dynamo.utils import counters  # loaded by torch.compile
    settings = [(torch._dynamo.config, "recompile_limit" if hasattr(torch._dynamo.config, "recompile_limit")
                 else "cache_size_limit", lambda outer: max(outer, RECOMPILE_LIMIT)),
                (torch.fx.experimental._config, "use_duck_shape", lambda outer: False)]

    @functools.wraps(fn)
    def run(*args: Any, **kwargs: Any) -> Any:
        AUTO.announce()
        outer = [getattr(config, key) for config, key, _ in settings]  # config.patch costs twice as much
        for (config, key, ours), value in zip(settings, outer):
            setattr(config, key, ours(value))
        graphs, start = counters["stats"]["unique_graphs"], time.perf_counter()
        try:
            return compiled(*map(_plain, args), **{k: _plain(v) for k, v in kwargs.items()})
        finally:
            for (config, key, _), value in zip(settings, outer):
                setattr(config, key, value)
            if counters["stats"]["unique_graphs"] != graphs:
                AUTO.compile_seconds += time.perf_counter() - start
    return run


def _triton() -> KernelSet:
    try:
        from . import triton_lif  # imports triton: only when this backend runs
    except ModuleNotFoundError as err:
        if err.name is None or err.name.split(".")[0] != "triton":
            raise
        raise ValueError("backend 'triton' needs the triton package, which is not installed: "
                         "pip install 'spikegrad[triton]' (or use backend 'fused')") from err
    return triton_lif.KERNELS


KERNELS: dict[str, Callable[[], KernelSet]] = {
    "eager": lambda: fused.torch_kernels(),
    "fused": lambda: fused.torch_kernels(_compiled),
    "triton": _triton,
}
"""The operator's kernel sets by name, each built on first use. Their names (with
``"auto"`` and the reference ``"torch"``) are ``neuron.BACKENDS``."""


@functools.lru_cache(maxsize=None)
def _built(name: str) -> KernelSet:
    return KERNELS[name]()


class AutoKernels:
    """What ``backend="auto"`` runs where the operator's default implementation runs (CPU):
    the uncompiled loops (``"eager"``) until compiling can pay, then the compiled ones
    (``"fused"``). One instance, ``AUTO``, per process.

    ``mode`` None (a script of the user's): until the process has made ``eager_calls``
    operator calls with gradients enabled (``$SPIKEGRAD_EAGER_CALLS``, default 100: a few
    training steps of a deep net) every call runs eager, so a quick try or an evaluation
    compiles nothing; after, calls run compiled, announced by one line on stderr. A
    trainer sets ``mode`` (``"eager"``/``"fused"``) itself, to switch at a step of its own
    (``kernels.warmup``). ``recorder``, when set, is called with every eager-mode call
    (``run``) that runs the eager kernels: ``(operator name, inputs, options)``
    (``kernels.warmup.Recorder``).
    ``compile_seconds`` sums the time spent in calls that compiled a graph (throughput
    figures leave it out).
    """

    def __init__(self) -> None:
        self.mode: Optional[str] = None
        self.eager_calls = int(os.environ.get("SPIKEGRAD_EAGER_CALLS", "100"))
        self.calls = 0
        self.recorder: Optional[Callable[..., None]] = None
        self.compile_seconds = 0.0
        self.announced = False

    def choose(self, default: str) -> str:
        """The kernel set for ``backend="auto"`` when the device's own is ``default``."""
        if default != "fused":
            return default
        if self.mode is not None:
            return self.mode
        return "eager" if self.calls <= self.eager_calls else "fused"

    def record(self, name: str, args: tuple, options: dict, default: str) -> None:
        """Hand the operator call ``name(*args, **options)`` to ``recorder`` if one is set
        and the call runs the eager kernels (``default``: the device's own kernel set)."""
        if (self.recorder is not None and options["backend"] == "auto"
                and self.choose(default) == "eager"):
            self.recorder(name, args, {k: v for k, v in options.items() if k != "backend"})

    def announce(self) -> None:
        """One line on stderr before the process's first compile."""
        if not self.announced:
            self.announced = True
            print("spikegrad: compiling the fused neuron kernels with torch.compile (about a minute "
                  "on a cold cache, seconds once cached; backend 'eager' skips it)",
                  file=sys.stderr, flush=True)


AUTO = AutoKernels()


def kernel_set(name: str, x: Tensor, surrogate: Any) -> KernelSet:
    """The kernel set ``name`` for input ``x``, or ``"fused"`` where it cannot run ``x``
    (Triton: float64, a non-spiking surrogate)."""
    if name not in KERNELS:
        raise ValueError(f"spikegrad::lif: backend must be one of auto, {', '.join(KERNELS)}, got {name!r}")
    if name == "triton" and not (x.is_cuda or os.environ.get("TRITON_INTERPRET") == "1"):
        raise ValueError(f"backend 'triton' needs CUDA tensors (or TRITON_INTERPRET=1 for CPU), "
                         f"got a tensor on {x.device}")
    kernels = _built(name)
    return kernels if kernels.supports(x, surrogate) else _built("fused")


# --- rows: the kernels' view of a tensor --------------------------------------------------------

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


def _order(x: Tensor) -> list[int]:
    return memory.memory_order(x) or list(range(x.dim()))


def _out_dtype(*tensors: Optional[Tensor]) -> torch.dtype:
    """The spikes' dtype: ``x``'s promoted with the residual's, ``v_init``'s and the norm's."""
    dtype = tensors[0].dtype
    for t in tensors[1:]:
        if t is not None:
            dtype = torch.promote_types(dtype, t.dtype)
    return dtype


def _empty(like: Tensor) -> Tensor:
    return like.new_empty(0)


def _like(x: Tensor, step: bool, dtype: torch.dtype) -> Tensor:
    """An empty tensor laid out as ``_unrows`` lays out ``x`` (``step``: ``x[0]``) for the
    fake implementations: ``x``'s layout when it has a memory order, else contiguous."""
    like = x[0] if step else x
    return torch.empty_like(like, dtype=dtype) if memory.memory_order(x) is not None else \
        like.new_empty(like.shape, dtype=dtype)


# --- the operator -------------------------------------------------------------------------------

@torch.library.custom_op("spikegrad::lif", mutates_args=())
def lif(x: Tensor, residual: Optional[Tensor], v_init: Optional[Tensor], decay: Optional[Tensor],
        norm_weight: Optional[Tensor], norm_bias: Optional[Tensor], *, fixed_decay: float,
        decay_input: bool, v_threshold: float, v_reset: Optional[float], detach_reset: bool,
        surrogate: str, norm_eps: float, keep_state: bool, mark_spikes: bool, backend: str
        ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The fused LIF (module docstring); returns ``(spikes, v_final, norm_mean, norm_var)``.
    This is the implementation for every device without its own: ``"auto"`` is ``"fused"``."""
    return _forward("fused", x, residual, v_init, decay, norm_weight, norm_bias, fixed_decay,
                    decay_input, v_threshold, v_reset, detach_reset, surrogate, norm_eps, keep_state,
                    mark_spikes, backend)


@lif.register_kernel("cuda")
def _lif_cuda(x, residual, v_init, decay, norm_weight, norm_bias, **options):
    return _forward(_device_default(x), x, residual, v_init, decay, norm_weight, norm_bias, **options)


def _forward(default: str, x: Tensor, residual: Optional[Tensor], v_init: Optional[Tensor],
             decay: Optional[Tensor], norm_weight: Optional[Tensor], norm_bias: Optional[Tensor],
             fixed_decay: float, decay_input: bool, v_threshold: float, v_reset: Optional[float],
             detach_reset: bool, surrogate: str, norm_eps: float, keep_state: bool,
             mark_spikes: bool, backend: str) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    sg = _surrogate(surrogate)
    kernels = kernel_set(AUTO.choose(default) if backend == "auto" else backend, x, sg)
    order, channels = _order(x), norm_weight is not None
    rows = _rows(x, order, channels)
    norm, mean, var = None, _empty(x), _empty(x)
    if channels:
        with torch.no_grad():
            mean, var = kernels.batch_stats(rows)
        norm = (norm_weight, norm_bias, mean, torch.rsqrt(var + norm_eps))
    spikes, v_final = kernels.forward(
        rows, None if residual is None else _rows(residual, order, channels),
        None if v_init is None else _rows(v_init.unsqueeze(0), order, channels)[0],
        fixed_decay if decay is None else decay, (decay_input, v_threshold, v_reset, detach_reset),
        sg, norm, keep_state)
    spikes = _unrows(spikes, x, order)
    if mark_spikes:
        memory.mark_spikes(spikes)
    v_final = _empty(x) if v_final is None else _unrows(v_final.unsqueeze(0), x[:1], order)[0]
    return spikes, v_final, mean, var


@lif.register_fake
def _lif_fake(x, residual, v_init, decay, norm_weight, norm_bias, *, keep_state, **options):
    dtype = _out_dtype(x, residual, v_init, norm_weight)
    v_final = _like(x, True, dtype) if keep_state else _empty(x)
    stats = [x.new_empty(x.shape[2]) if norm_weight is not None else _empty(x) for _ in range(2)]
    return _like(x, False, dtype), v_final, *stats


def _setup_context(ctx: Any, inputs: tuple, keyword_only_inputs: dict, output: tuple) -> None:
    x, residual, v_init, decay, norm_weight, norm_bias = inputs
    _, _, mean, var = output
    ctx.options = {k: v for k, v in keyword_only_inputs.items() if k != "mark_spikes"}
    ctx.surrogate = _SURROGATES.get(ctx.options["surrogate"])  # alive until backward has run
    ctx.has = [t is not None for t in inputs]
    ctx.mark_non_differentiable(mean, var)
    ctx.save_for_backward(x, residual, v_init, decay, norm_weight, norm_bias,
                          mean if norm_weight is not None else None,
                          var if norm_weight is not None else None)


def _backward(ctx: Any, grad_spikes: Tensor, grad_v: Tensor, _grad_mean: Any, _grad_var: Any,
              backward: Callable[..., tuple] = lambda *args, **options: torch.ops.spikegrad.lif_backward(
                  *args, **options)) -> tuple:
    x, residual, v_init, decay, norm_weight, norm_bias, mean, var = ctx.saved_tensors
    grads = backward(
        grad_spikes, grad_v if ctx.options["keep_state"] else None, x, residual, v_init, decay,
        norm_weight, norm_bias, mean, var, decay_grad=bool(ctx.needs_input_grad[3]), **ctx.options)
    if norm_weight is None:  # the residual's gradient is the input's
        grads = (grads[0], grads[0], *grads[2:])
    return tuple(g if has else None for g, has in zip(grads, ctx.has))


lif.register_autograd(_backward, setup_context=_setup_context)


def _device_default(x: Tensor) -> str:
    """The kernel set the operator's registration for ``x``'s device runs."""
    return "triton" if x.is_cuda and triton_installed() else "fused"


class _Eager(torch.autograd.Function):
    """The operator's forward and backward as a plain autograd node, for eager mode: the
    same implementations without the dispatcher's Python custom-op layers (measured:
    about 0.4 ms per layer and training step on CPU, a few percent of a small net's step)."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, residual: Optional[Tensor], v_init: Optional[Tensor],
                decay: Optional[Tensor], norm_weight: Optional[Tensor], norm_bias: Optional[Tensor],
                options: dict) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        inputs, default = (x, residual, v_init, decay, norm_weight, norm_bias), _device_default(x)
        AUTO.record("lif", inputs, options, default)
        output = _forward(default, *inputs, **options)
        _setup_context(ctx, inputs, options, output)
        return output

    @staticmethod
    def backward(ctx: Any, *grads: Tensor) -> tuple:
        default = _device_default(ctx.saved_tensors[0])

        def rows(*args: Tensor, **options: Any) -> tuple:
            AUTO.record("lif_backward", args, options, default)
            return _backward_rows(default, *args, **options)
        return (*_backward(ctx, *grads, backward=rows), None)


def run(x: Tensor, residual: Optional[Tensor], v_init: Optional[Tensor], decay: Optional[Tensor],
        norm_weight: Optional[Tensor], norm_bias: Optional[Tensor], **options: Any
        ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``torch.ops.spikegrad.lif(...)`` as the neurons call it: under ``torch.compile`` the
    operator itself (traced without a graph break), in eager mode the same forward and
    backward as one ``autograd.Function`` (``_Eager``), which skips the dispatcher's
    Python layers. Same arguments, same outputs."""
    if torch.compiler.is_compiling():
        return torch.ops.spikegrad.lif(x, residual, v_init, decay, norm_weight, norm_bias, **options)
    AUTO.calls += torch.is_grad_enabled()
    return _Eager.apply(x, residual, v_init, decay, norm_weight, norm_bias, options)


@torch.library.custom_op("spikegrad::lif_backward", mutates_args=())
def lif_backward(grad_spikes: Tensor, grad_v: Optional[Tensor], x: Tensor, residual: Optional[Tensor],
                 v_init: Optional[Tensor], decay: Optional[Tensor], norm_weight: Optional[Tensor],
                 norm_bias: Optional[Tensor], norm_mean: Optional[Tensor], norm_var: Optional[Tensor], *,
                 fixed_decay: float, decay_input: bool, v_threshold: float, v_reset: Optional[float],
                 detach_reset: bool, surrogate: str, norm_eps: float, keep_state: bool, backend: str,
                 decay_grad: bool) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """``lif``'s backward: ``(dL/dx, dL/dresidual, dL/dv_init, dL/ddecay, dL/dnorm_weight,
    dL/dnorm_bias)``, each of its input's shape and dtype (empty where that input is None,
    for ``decay`` unless ``decay_grad``, and for the residual without a norm: then it is
    ``dL/dx``). The surrogate derivative (MSG's mask drawn
    here, from its generator) over ``[T, N]``, then the kernel set's reverse-time scan."""
    return _backward_rows("fused", grad_spikes, grad_v, x, residual, v_init, decay, norm_weight,
                          norm_bias, norm_mean, norm_var, fixed_decay, decay_input, v_threshold, v_reset,
                          detach_reset, surrogate, norm_eps, backend, decay_grad, keep_state)


@lif_backward.register_kernel("cuda")
def _lif_backward_cuda(*args, **options):
    return _backward_rows(_device_default(args[2]), *args, **options)


def _backward_rows(default: str, grad_spikes: Tensor, grad_v: Optional[Tensor], x: Tensor,
                   residual: Optional[Tensor], v_init: Optional[Tensor], decay: Optional[Tensor],
                   norm_weight: Optional[Tensor], norm_bias: Optional[Tensor],
                   norm_mean: Optional[Tensor], norm_var: Optional[Tensor], fixed_decay: float,
                   decay_input: bool, v_threshold: float, v_reset: Optional[float], detach_reset: bool,
                   surrogate: str, norm_eps: float, backend: str, decay_grad: bool, keep_state: bool
                   ) -> tuple[Tensor, ...]:
    sg = _surrogate(surrogate)
    kernels = kernel_set(AUTO.choose(default) if backend == "auto" else backend, x, sg)
    order, channels = _order(x), norm_weight is not None
    rows = _rows(x, order, channels)
    sg, mask = sg.split_mask(rows)  # MSG's mask is drawn here, eagerly
    norm = None if not channels else (norm_weight, norm_bias, norm_mean, torch.rsqrt(norm_var + norm_eps))
    grad_x, grad_residual, grad_v0, grad_decay, grad_weight, grad_bias = kernels.backward(
        rows, None if residual is None else _rows(residual, order, channels),
        None if v_init is None else _rows(v_init.unsqueeze(0), order, channels)[0],
        _rows(grad_spikes, order, channels),
        None if grad_v is None else _rows(grad_v.unsqueeze(0), order, channels)[0],
        fixed_decay if decay is None else decay, (decay_input, v_threshold, v_reset, detach_reset),
        sg, mask, decay_grad and decay is not None, norm)
    grad_x = _unrows(grad_x, x, order).to(x.dtype)
    # without a norm the residual's gradient is the input's: not returned twice (outputs may not alias)
    grad_residual = (_empty(x) if residual is None or not channels
                     else _unrows(grad_residual, x, order).to(residual.dtype))
    grad_v0 = _empty(x) if v_init is None else _unrows(grad_v0.unsqueeze(0), x[:1], order)[0].to(v_init.dtype)
    grad_decay = _empty(x) if grad_decay is None else grad_decay.to(decay.dtype)
    return (grad_x, grad_residual, grad_v0, grad_decay,
            _empty(x) if grad_weight is None else grad_weight.to(norm_weight.dtype),
            _empty(x) if grad_bias is None else grad_bias.to(norm_bias.dtype))


@lif_backward.register_fake
def _lif_backward_fake(grad_spikes, grad_v, x, residual, v_init, decay, norm_weight, norm_bias,
                       norm_mean, norm_var, *, decay_grad, **options):
    def like(t: Optional[Tensor], step: bool = False) -> Tensor:
        return _empty(x) if t is None else _like(x, step, t.dtype)
    return (like(x), like(residual if norm_weight is not None else None), like(v_init, True),
            _empty(x) if not decay_grad or decay is None else torch.empty_like(decay),
            _empty(x) if norm_weight is None else torch.empty_like(norm_weight),
            _empty(x) if norm_bias is None else torch.empty_like(norm_bias))

"""Lean training memory: what autograd keeps between a spiking net's forward and backward.

A conv -> BN -> neuron layer of a plain PyTorch SNN keeps three float tensors of the
layer's size for backward: the conv's input (spikes), the BN's input and the neuron's
membrane. Here it keeps one float tensor and one bit per element:

1. **Spikes as bits.** Spikes are 0/1. Inside ``saved_tensors()`` every tensor a neuron
   marked with ``mark_spikes`` is stored bit-packed (8 spikes per byte) when autograd
   saves it (the next conv, for its weight gradient; a residual) and rebuilt in its float
   dtype in backward: the same values, 1/32 of the bytes. Marks are checked against the tensor's
   version counter, so a spike tensor changed in place is saved as it is.
2. **BatchNorm that saves its output.** ``BatchNorm2d`` (a drop-in subclass of
   ``nn.BatchNorm2d``, same ``state_dict``) keeps ``y = BN(x)`` instead of ``x`` and
   recovers ``x_hat = (y - beta) / gamma`` in backward (the in-place-ABN identity). The
   fused neuron after it saves its input, which is that same ``y``, and recomputes its
   membrane (the operator ``torch.ops.spikegrad.lif``, ``kernels.lif``): one tensor
   serves both. In training the fused neurons go further and fold the batch norm into
   their loop (``BatchNorm2d.folds``, ``layers.ConvBN.fire``): ``y`` is never written, and
   the conv output is kept instead.

Both are exact up to float rounding (the spikes bit for bit). Where the identity is
ill-conditioned (``|gamma| < GAMMA_MIN`` in some channel), under autocast, for a
non-affine BN, outside training and inside ``torch.compile`` (whose partitioner plans
the saved tensors itself), ``BatchNorm2d`` is PyTorch's.
"""
from __future__ import annotations

import contextlib
import threading
import weakref
from typing import Any, Iterator

import torch
from torch import Tensor, nn

__all__ = ["memory_order", "saved_tensors", "SavedTensors", "mark_spikes", "is_spikes", "relayout", "pack_bits", "unpack_bits", "BatchNorm2d", "batch_norm_saving_output", "GAMMA_MIN"]

GAMMA_MIN = 1e-3
_state = threading.local()


def memory_order(t: Tensor) -> list[int] | None:
    """The permutation of ``t``'s dims, outermost in memory first, that makes it contiguous
    (dim 0 first), or None when ``t`` is not dense or dim 0 is not outermost."""
    order = sorted(range(t.dim()), key=lambda d: -t.stride(d))  # stable: dim 0 first on ties
    return order if order[:1] in ([], [0]) and t.permute(order).is_contiguous() else None


def _bit_weights(dtype: torch.dtype, device: torch.device) -> Tensor:
    """``[8]``: 1, 2, 4, ..., 128 in ``dtype`` (exact in every float dtype)."""
    return torch.pow(2.0, torch.arange(8, device=device)).to(dtype)


def _bit_table(dtype: torch.dtype, device: torch.device) -> Tensor:
    """``[256, 8]``: row ``b`` holds the bits of byte ``b``, lowest first, in ``dtype``."""
    return ((torch.arange(256, device=device).unsqueeze(1) >> torch.arange(8, device=device)) & 1).to(dtype)


def pack_bits(spikes: Tensor) -> Tensor:
    """0/1 values (any float shape, contiguous) -> uint8 ``[ceil(numel / 8)]``, 8 per byte.

    Each group of 8 spikes is one dot product with ``[1, 2, ..., 128]`` (exact: at most 255),
    so packing is a single matrix-vector product over the spikes, with no integer passes."""
    flat = spikes.reshape(-1)
    if flat.numel() % 8:
        flat = torch.nn.functional.pad(flat, (0, -flat.numel() % 8))
    return (flat.view(-1, 8) @ _bit_weights(flat.dtype, flat.device)).to(torch.uint8)


def unpack_bits(bits: Tensor, numel: int, dtype: torch.dtype) -> Tensor:
    """``pack_bits``' inverse: ``[numel]`` of 0/1 in ``dtype``: each byte looks up its 8
    values in a 256-row table (one gather that writes the output once)."""
    rows = torch.nn.functional.embedding(bits.to(torch.int32), _bit_table(dtype, bits.device))
    return rows.view(-1)[:numel]


class _Mark:
    """A marked spike tensor (weakly held: a mark never keeps spikes alive), the version it
    was marked at, and its bit-packed copy once one was saved.

    Several layers may save the same spikes (a block's first conv and its residual, or a
    conv and its downsampling shortcut): the bits are packed once, and in backward unpacked
    once, the float copy being kept only until the last of those savers has taken it."""

    __slots__ = ("ref", "version", "numel", "dtype", "bits", "pending", "unpacked")

    def __init__(self, spikes: Tensor) -> None:
        self.ref = weakref.ref(spikes)
        self.version = spikes._version
        self.numel, self.dtype = spikes.numel(), spikes.dtype
        self.bits: Tensor | None = None
        self.pending = 0  # saved views not yet unpacked
        self.unpacked: Tensor | None = None

    def current(self, t: Tensor) -> bool:
        """Whether the marked spikes are alive and ``t`` (sharing their storage) is unchanged
        since marking."""
        return self.ref() is not None and t._version == self.version

    def packed(self, t: Tensor) -> "_Saved | None":
        """``t`` bit-packed if it views the whole of the marked spikes (``current(t)`` holds);
        else None. One packed copy serves every view any layer saves (the next conv's
        ``[T*B, ...]`` and a residual ``[T, B, ...]`` alike)."""
        spikes = self.ref()
        if (spikes is None or t.dtype != spikes.dtype
                or t.untyped_storage().nbytes() != spikes.numel() * spikes.element_size()):
            return None
        if self.bits is None:
            order = memory_order(spikes)  # spikes are dense and alone in their storage
            self.bits = pack_bits(spikes.permute(order))  # in memory order, as as_strided reads
        self.pending += 1
        return _Saved(self.bits, (self, t.size(), t.stride(), t.storage_offset()))

    def unpack(self) -> Tensor:
        """The spikes as ``[numel]`` values of their dtype in memory order, for one saved view:
        unpacked by the first view to ask and kept while other views are still due."""
        flat = self.unpacked if self.unpacked is not None else unpack_bits(self.bits, self.numel, self.dtype)
        self.pending -= 1
        self.unpacked = flat if self.pending > 0 else None
        return flat


class _Saved:
    """What autograd holds for one saved tensor: the tensor, or packed spike bits and how to
    rebuild the view that was saved (mark, size, stride, offset). Its lifetime
    is the graph's hold on it, which ``SavedTensors`` counts."""

    __slots__ = ("tensor", "view", "__weakref__")

    def __init__(self, tensor: Tensor, view: tuple | None = None) -> None:
        self.tensor, self.view = tensor, view

    def unpack(self) -> Tensor:
        if self.view is None:
            return self.tensor
        mark, size, stride, offset = self.view
        return mark.unpack().as_strided(size, stride, offset)


class SavedTensors:
    """What autograd keeps from a ``saved_tensors()`` block: ``nbytes`` is the size of the
    distinct storages the graph still holds (each counted once, packed spikes at their own
    size); it falls as backward or garbage collection releases them."""

    def __init__(self, compact: bool) -> None:
        self.compact = compact
        self.marks: dict[int, _Mark] = {}
        self._held: dict[int, list[int]] = {}  # storage address -> [bytes, holders]

    @property
    def nbytes(self) -> int:
        return sum(size for size, holders in self._held.values() if holders > 0)

    def mark_of(self, t: Tensor) -> _Mark | None:
        """The mark of the spikes whose storage ``t`` shares, if current (see ``_Mark.current``)."""
        mark = self.marks.get(t.untyped_storage().data_ptr())
        return mark if mark is not None and mark.current(t) else None

    def pack(self, t: Tensor) -> _Saved:
        """Autograd's pack hook: marked spikes -> packed bits, other tensors as they are."""
        mark = self.mark_of(t) if self.compact else None
        packed = mark.packed(t) if mark is not None else None
        return self._hold(_Saved(t) if packed is None else packed)

    def _hold(self, saved: _Saved) -> _Saved:
        storage = saved.tensor.untyped_storage()
        key = storage.data_ptr()
        entry = self._held.get(key)
        if entry is None or entry[1] == 0:
            entry = self._held[key] = [storage.nbytes(), 0]
        entry[1] += 1
        weakref.finalize(saved, self._release, key)
        return saved

    def _release(self, key: int) -> None:
        self._held[key][1] -= 1


def _active() -> SavedTensors | None:
    """The open ``saved_tensors()`` record; None outside one and under ``torch.compile``
    (whose partitioner plans the saved tensors: nothing to mark or count)."""
    return None if torch.compiler.is_compiling() else getattr(_state, "active", None)


def mark_spikes(spikes: Tensor) -> None:
    """Declare ``spikes`` (any shape) to hold only 0 and 1; a no-op outside ``saved_tensors()``
    and for a tensor that is not dense (any layout, e.g. channels-last) and alone in its storage."""
    active = _active()
    if (active is not None and memory_order(spikes) is not None and spikes.storage_offset() == 0
            and spikes.untyped_storage().nbytes() == spikes.numel() * spikes.element_size()):
        active.marks[spikes.untyped_storage().data_ptr()] = _Mark(spikes)


def is_spikes(t: Tensor) -> bool:
    """Whether ``t`` views (unchanged) spikes a neuron marked (``mark_spikes``) in the open
    ``saved_tensors()`` block: its values are 0 and 1. False outside such a block."""
    active = _active()
    return active is not None and active.mark_of(t) is not None


def relayout(t: Tensor, memory_format: torch.memory_format) -> Tensor:
    """``t.contiguous(memory_format=...)`` that keeps a spike mark: the copy of marked spikes
    is marked too, so the layer that saves it still saves bits.

    A 4-d ``t`` asked to be channels-last that already is, but with strides that read as
    contiguous too (one channel, as a grey image has), gets a channels-last stride for the
    channel (a view of the same memory): oneDNN lays a convolution's output out as its
    input's strides suggest, and would otherwise write it contiguous."""
    out = t.contiguous(memory_format=memory_format)
    if (memory_format is torch.channels_last and out is t and t.dim() == 4 and t.shape[1] == 1
            and t.stride(1) != 1 and not torch.compiler.is_compiling()):  # inductor lays out its own
        return t.as_strided(t.shape, (t.stride(0), 1, t.stride(2), t.stride(3)))
    active = _active()
    if out is not t and active is not None and active.mark_of(t) is not None:
        mark_spikes(out)
    return out


@contextlib.contextmanager
def saved_tensors(compact: bool = True) -> Iterator[SavedTensors | None]:
    """Within the block, autograd's saved tensors are counted and, with ``compact``, marked
    spikes (``mark_spikes``) are kept bit-packed; yields the ``SavedTensors`` record.

    A nested block changes nothing: the outermost block decides and counts. The models
    open one around their forward. Under ``torch.compile`` it does nothing (yields None):
    the compiler plans what its graph saves.
    """
    outer = _active()
    if outer is not None or torch.compiler.is_compiling():
        yield outer
        return
    _state.active = record = SavedTensors(compact)
    try:
        with torch.autograd.graph.saved_tensors_hooks(record.pack, _Saved.unpack):
            yield record
    finally:
        _state.active = None


def _channel(v: Tensor, like: Tensor) -> Tensor:
    """A per-channel vector ``[C]`` shaped to broadcast over ``like: [N, C, ...]``."""
    return v.view(1, -1, *([1] * (like.dim() - 2)))


class _BatchNormSavingOutput(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: Tensor, weight: Tensor, bias: Tensor, running_mean: Tensor | None,
                running_var: Tensor | None, momentum: float, eps: float) -> Tensor:
        y, _, invstd = torch.native_batch_norm(x, weight, bias, running_mean, running_var,
                                               True, momentum, eps)
        ctx.save_for_backward(y, weight, bias, invstd)
        return y

    @staticmethod
    def backward(ctx: Any, grad_y: Tensor):
        y, weight, bias, invstd = ctx.saved_tensors
        inverse = 1.0 / weight
        x_hat = torch.addcmul(_channel(-bias * inverse, y), y, _channel(inverse, y))  # (y - beta) / gamma
        # PyTorch's own BN backward on x_hat (mean 0, invstd 1) with the scale folded into
        # the weight gives the same three gradients in one pass and no other temporary
        grad_x, grad_weight, grad_bias = torch.ops.aten.native_batch_norm_backward(
            grad_y, x_hat, weight * invstd, None, None, torch.zeros_like(invstd),
            torch.ones_like(invstd), True, 0.0, list(ctx.needs_input_grad[:3]))
        return grad_x, grad_weight, grad_bias, None, None, None, None


def batch_norm_saving_output(x: Tensor, weight: Tensor, bias: Tensor, running_mean: Tensor | None,
                             running_var: Tensor | None, momentum: float, eps: float) -> Tensor:
    """Training-mode batch norm of ``x: [N, C, ...]`` (batch statistics; running ones updated
    in place when given) that saves its output for backward; the result is ``[N, C, ...]``."""
    return _BatchNormSavingOutput.apply(x, weight, bias, running_mean, running_var, momentum, eps)


class BatchNorm2d(nn.BatchNorm2d):
    """``nn.BatchNorm2d`` on ``[N, C, H, W]`` that, in training, saves its output instead of
    its input (see the module docstring); otherwise, and in every other respect, PyTorch's.

    A fused neuron may also fold it into its own loop (``neuron(x, norm=bn)``, when
    ``folds(x)``): it computes the batch statistics, hands them to ``record`` and never
    writes the normalised tensor."""

    def forward(self, x: Tensor) -> Tensor:
        """``[N, C, H, W]`` -> ``[N, C, H, W]``."""
        if not self._saves_output(x):
            return super().forward(x)
        self._check_input_dim(x)
        return batch_norm_saving_output(x, self.weight, self.bias, self.running_mean,
                                        self.running_var, self._next_momentum(), self.eps)

    def folds(self, x: Tensor) -> bool:
        """Whether a fused neuron may fold this batch norm of ``x: [T, B, C, H, W]`` into its
        loop: training with batch statistics, affine, float32/64, no autocast, not compiled."""
        return self._batch_mode(x) and x.dim() == 5 and x.numel() // x.shape[2] > 1

    def record(self, mean: Tensor, var: Tensor, count: int) -> None:
        """Account a batch normalised outside ``forward``: per-channel ``mean`` and biased
        ``var`` (``[C]``) over ``count`` values per channel update the running statistics
        (with the unbiased variance) and the batch count, as ``forward`` would."""
        momentum = self._next_momentum()
        with torch.no_grad():
            self.running_mean.lerp_(mean, momentum)
            self.running_var.lerp_(var * (count / (count - 1)), momentum)

    def _next_momentum(self) -> float:
        """Counts a batch and returns the running statistics' momentum for it."""
        self.num_batches_tracked.add_(1)
        return 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum

    def _saves_output(self, x: Tensor) -> bool:
        return (self._batch_mode(x) and torch.is_grad_enabled()
                and bool(self.weight.detach().abs().min() >= GAMMA_MIN))

    def _batch_mode(self, x: Tensor) -> bool:
        return (self.training and self.affine and self.track_running_stats
                and not torch.compiler.is_compiling()
                and x.dtype in (torch.float32, torch.float64)
                and not torch.is_autocast_enabled(x.device.type))

"""NIR export (``to_nir``, ``export_nir``) and import (``from_nir``) of spiking networks.

NIR (the Neuromorphic Intermediate Representation) describes a network as a graph of
continuous-time primitives; every simulator discretises them with its own step ``dt``.
Our neurons are discrete, so the export states the step (graph metadata ``dt``) and
chooses the continuous parameters whose forward-Euler step of length ``dt`` is our
update exactly (docs/nir.md derives the mapping):

    decay_input=False:  tau = tau_steps * dt,  r = tau_steps,  v_leak = v_reset
    decay_input=True:   tau = tau_steps * dt,  r = 1,          v_leak = v_reset
    IF:                 r = 1 / dt

The default ``dt`` is 1e-4, the step snnTorch's and SpikingJelly's importers assume, so
they read the default file as our model; another ``dt`` warns (``NIRDtWarning``).
Registry models and users' own networks of spikegrad layers in ``nn.Sequential``
containers are exported. Batch norm is folded into the preceding convolution or linear
layer (``fold_bn``), residual additions become several edges into one node (NIR sums a
node's inputs), and the head's global average pooling becomes ``AvgPool2d`` over the
whole map, then ``Flatten`` (negative dims) and ``Affine``. Per-step shapes exclude time
and batch (``[C, H, W]``).

``from_nir`` builds a ``NIRNet`` from such a graph (and from the common primitives
other libraries write) out of spikegrad's own layers and neurons. A round trip
spikegrad -> NIR -> spikegrad gives spikes and logits bit-identical to the folded model
(``fold_bn(model)``); against the unfolded model, the fold's float rounding can flip
the rare spike whose membrane lies within rounding of the threshold.
"""
from __future__ import annotations

import copy
import functools
import math
import warnings
from collections import OrderedDict
from pathlib import Path
from typing import Any, Callable, NamedTuple

import numpy as np
import torch
from torch import Tensor, nn
from torch.nn import functional as F

try:
    import nir
except ImportError as err:  # the optional extra
    raise ImportError("spikegrad.nir needs the 'nir' package: pip install 'spikegrad[nir]'") from err

from . import __version__
from .checkpoint import atomic_write
from .layers import ENCODERS, AvgPool2x2, Head, SeqToANN, _Encoder
from .models import SpikingNet
from .models.resnet import BasicBlock
from .neuron import IF, LIF, BaseNeuron
from .shortcut import ShortcutNet

__all__ = ["fold_bn", "to_nir", "export_nir", "from_nir", "NIRNet", "NIRDtWarning", "DEFAULT_DT"]

DEFAULT_DT = 1e-4  # the step snnTorch's and SpikingJelly's NIR importers assume

_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d)
_FOLDS_INTO = (nn.Conv2d, nn.Linear)
_REL_TOL = 1e-6  # NIR arrays are float32: values within this of each other are taken as equal


# ---------------------------------------------------------------- batch-norm folding
def fold_bn(model: nn.Module) -> nn.Module:
    """A copy of ``model`` in eval mode with every batch norm folded into the Conv2d or
    Linear layer right before it (same ``nn.Sequential``) and removed.

    Outputs equal the eval-mode model's up to float rounding (the fold is computed in
    float64, then stored in the layer's dtype); folded layers get a bias. A batch norm
    that does not follow a Conv2d/Linear, or keeps no running statistics, is refused.
    """
    folded = copy.deepcopy(model).eval()
    for prefix, seq in list(folded.named_modules()):
        if isinstance(seq, nn.Sequential):
            _fold_sequence(seq, prefix)
    left = [name for name, m in folded.named_modules() if isinstance(m, _NORMS)]
    if left:
        raise ValueError(f"cannot fold batch norm layer {left[0]!r}: it must directly follow a "
                         "Conv2d or Linear layer in the same nn.Sequential")
    return folded


def _fold_sequence(seq: nn.Sequential, prefix: str) -> None:
    """Fold every (Conv2d/Linear, BatchNorm) pair of consecutive children of ``seq``."""
    names = list(seq._modules)
    pairs = [(a, b) for a, b in zip(names, names[1:])
             if isinstance(seq._modules[a], _FOLDS_INTO) and isinstance(seq._modules[b], _NORMS)]
    for layer, norm in pairs:
        _fold_into(seq._modules[layer], seq._modules[norm], f"{prefix}.{norm}" if prefix else norm)
        del seq._modules[norm]


@torch.no_grad()
def _fold_into(layer: nn.Conv2d | nn.Linear, norm: nn.modules.batchnorm._BatchNorm, name: str) -> None:
    """``layer`` followed by eval-mode ``norm`` as one layer: ``W' = W s``, ``b' = (b - mean) s + beta``."""
    if norm.running_mean is None:
        raise ValueError(f"cannot fold batch norm layer {name!r}: it keeps no running statistics "
                         "(track_running_stats=False), so eval mode still uses batch statistics")
    scale = (norm.running_var.double() + norm.eps).rsqrt()
    shift = -norm.running_mean.double() * scale
    if norm.affine:
        scale, shift = scale * norm.weight.double(), shift * norm.weight.double() + norm.bias.double()
    weight = layer.weight.double() * scale.view(-1, *[1] * (layer.weight.dim() - 1))
    bias = shift if layer.bias is None else layer.bias.double() * scale + shift
    layer.weight.copy_(weight)
    layer.bias = nn.Parameter(bias.to(layer.weight.dtype))


# ------------------------------------------------------------------------- export
class _Value(NamedTuple):
    """A tensor during tracing: the sum of the outputs of NIR nodes ``sources``; per-step ``shape``."""

    sources: tuple[str, ...]
    shape: tuple[int, ...]


def _merge(a: _Value, b: _Value, where: str) -> _Value:
    """``a + b`` as a value: the union of their sources (NIR sums a node's inputs)."""
    if a.shape != b.shape or set(a.sources) & set(b.sources):
        raise ValueError(f"layer {where!r}: cannot express the addition of {a} and {b} as NIR edges")
    return _Value(a.sources + b.sources, a.shape)


def _f32(value: float, shape: tuple[int, ...]) -> np.ndarray:
    """A float32 array of ``shape`` filled with ``value`` (NIR's per-neuron parameters)."""
    return np.full(shape, value, dtype=np.float32)


def _neuron_node(kind: type, shape: tuple[int, ...], **params: float) -> nir.NIRNode:
    """A NIR neuron of per-step ``shape``: float32 arrays (what simulators read) and, in the
    node's metadata ``float64``, the exact scalars (what ``from_nir`` prefers when they agree)."""
    arrays = {key: _f32(value, shape) for key, value in params.items()}
    return kind(**arrays, metadata={"float64": {key: float(v) for key, v in params.items()}})


def _time_constant(neuron: BaseNeuron) -> float:
    """``tau`` in steps: LIF's own value (no reciprocal round trip), else ``1 / decay``."""
    return neuron.tau if isinstance(neuron, LIF) else 1.0 / float(neuron.decay())


@torch.no_grad()
def _neuron_to_nir(neuron: BaseNeuron, name: str, shape: tuple[int, ...], dt: float) -> nir.NIRNode:
    """LIF/PLIF -> ``nir.LIF``, IF -> ``nir.IF`` (hard reset only), per the module docstring's mapping."""
    if neuron.v_reset is None:
        raise ValueError(f"layer {name!r} uses a soft (subtractive) reset (v_reset=None), which NIR's "
                         "LIF/IF cannot express (they reset to v_reset); use a hard reset (v_reset=0.0)")
    thresholds = {"v_threshold": neuron.v_threshold, "v_reset": neuron.v_reset}
    if float(neuron.decay()) == 0.0:
        return _neuron_node(nir.IF, shape, r=1.0 / dt, **thresholds)
    tau_steps = _time_constant(neuron)
    r = 1.0 if neuron.decay_input else tau_steps
    return _neuron_node(nir.LIF, shape, tau=tau_steps * dt, r=r, v_leak=neuron.v_reset, **thresholds)


def _conv_to_nir(conv: nn.Conv2d, name: str, shape: tuple[int, ...]) -> nir.Conv2d:
    """``nn.Conv2d`` (zero padding) -> ``nir.Conv2d``; no bias is written as zeros."""
    if conv.padding_mode != "zeros" or isinstance(conv.padding, str):
        raise ValueError(f"layer {name!r} (Conv2d) pads with {conv.padding!r} ({conv.padding_mode}); "
                         "NIR's Conv2d takes explicit zero padding only")
    bias = conv.bias if conv.bias is not None else torch.zeros(conv.out_channels)
    return nir.Conv2d(input_shape=shape[1:], weight=_array(conv.weight), stride=conv.stride,
                      padding=conv.padding, dilation=conv.dilation, groups=conv.groups,
                      bias=_array(bias))


def _linear_to_nir(linear: nn.Linear) -> nir.Affine:
    """``nn.Linear`` -> ``nir.Affine``; no bias is written as zeros."""
    bias = linear.bias if linear.bias is not None else torch.zeros(linear.out_features)
    return nir.Affine(weight=_array(linear.weight), bias=_array(bias))


def _avg_pool(kernel: tuple[int, int], stride: tuple[int, int], padding: tuple[int, int]) -> nir.AvgPool2d:
    return nir.AvgPool2d(kernel_size=np.array(kernel), stride=np.array(stride), padding=np.array(padding))


def _array(t: Tensor) -> np.ndarray:
    """A detached CPU numpy copy of ``t``."""
    return t.detach().cpu().numpy().copy()


def _out_shape(node: nir.NIRNode, shape: tuple[int, ...]) -> tuple[int, ...]:
    """Per-step output shape of ``node`` fed ``shape`` (NIR's own shape rules)."""
    out = node.output_type["output"]
    if out is None:  # pooling: NIR leaves it to type inference
        out = [shape[0], *nir.ir.utils.calculate_conv_output(shape[1:], node.padding, 1,
                                                             node.kernel_size, node.stride)]
    return tuple(int(s) for s in out)


class _Tracer:
    """Walks a BN-free network in forward order and records NIR nodes and edges.

    It follows spikegrad's registry models and blocks (``SpikingNet``, ``BasicBlock``,
    ``Head``) and ``nn.Sequential`` containers (``SeqToANN``, ``ConvBN``, a user's own
    ``nn.Sequential``); ``flat`` is True inside a ``SeqToANN``, where tensors are
    ``[T*B, ...]`` instead of ``[T, B, ...]`` (it matters to ``nn.Flatten``'s dims).
    """

    SUPPORTED = ("Conv2d, Linear, AvgPool2d, AdaptiveAvgPool2d (whole windows), Flatten, Dropout, "
                 "Identity, LIF/IF/PLIF (hard reset), an encoder first, SeqToANN and other "
                 "nn.Sequential containers, BasicBlock, Head")

    def __init__(self, dt: float) -> None:
        self.dt = dt
        self.nodes: dict[str, nir.NIRNode] = {}
        self.edges: list[tuple[str, str]] = []
        self.encoder: _Encoder | None = None

    def add(self, name: str, node: nir.NIRNode, x: _Value) -> _Value:
        """Record ``node`` fed by ``x``'s sources; returns its output."""
        self.nodes[name] = node
        self.edges += [(src, name) for src in x.sources]
        return _Value((name,), _out_shape(node, x.shape))

    def trace(self, module: nn.Module, name: str, x: _Value, flat: bool = False) -> _Value:
        """``module`` (qualified ``name``) applied to ``x``."""
        for kind, method in ((SpikingNet, self._net), (BasicBlock, self._block), (Head, self._head)):
            if isinstance(module, kind):
                return method(module, name, x)
        if isinstance(module, nn.Sequential):
            return self._sequence(module, name, x, flat or isinstance(module, SeqToANN))
        if isinstance(module, _Encoder):
            return self._encoder(module, name, x)
        if isinstance(module, (nn.Identity, nn.Dropout, nn.Dropout2d)) or (
                isinstance(module, AvgPool2x2) and min(x.shape[-2:]) < 2):
            return x
        return self.add(name, self._leaf(module, name, x.shape, flat), x)

    def _leaf(self, module: nn.Module, name: str, shape: tuple[int, ...], flat: bool) -> nir.NIRNode:
        """The NIR node of one layer; anything else is refused, naming the layer."""
        if isinstance(module, BaseNeuron):
            return _neuron_to_nir(module, name, shape, self.dt)
        if isinstance(module, nn.Conv2d):
            return _conv_to_nir(module, name, shape)
        if isinstance(module, nn.Linear):
            return _linear_to_nir(module)
        if isinstance(module, AvgPool2x2):
            return _avg_pool((2, 2), (2, 2), (0, 0))
        if isinstance(module, nn.AvgPool2d):
            return _avg_pool_to_nir(module, name)
        if isinstance(module, nn.AdaptiveAvgPool2d):
            return _adaptive_pool_to_nir(module, name, shape)
        if isinstance(module, nn.Flatten):
            return _flatten_to_nir(module, name, shape, flat)
        what = ("a module with its own forward(), which to_nir cannot follow; build the network from "
                "nn.Sequential containers (SeqToANN for stateless layers) of"
                if next(module.children(), None) is not None else "not expressible in NIR; supported:")
        raise ValueError(f"layer {name!r} ({type(module).__name__}) is {what} {self.SUPPORTED}")

    def _sequence(self, seq: nn.Sequential, name: str, x: _Value, flat: bool) -> _Value:
        for child, module in seq.named_children():
            x = self.trace(module, f"{name}.{child}" if name else child, x, flat)
        return x

    def _encoder(self, encoder: _Encoder, name: str, x: _Value) -> _Value:
        """An encoder is graph metadata (T, encoding), not a node: only first in the network."""
        if x.sources != ("input",) or self.encoder is not None:
            raise ValueError(f"layer {name!r} ({type(encoder).__name__}) is an encoder after other layers; "
                             "an encoder can only come first (it becomes the graph's metadata)")
        self.encoder = encoder
        return x

    def _net(self, net: SpikingNet, name: str, x: _Value) -> _Value:
        """encoder (graph metadata, not a node) -> stem -> stages -> head."""
        x = self._encoder(net.encoder, f"{name}.encoder" if name else "encoder", x)
        for part in ("stem", *net.all_stages, "head"):
            x = self.trace(getattr(net, part), f"{name}.{part}" if name else part, x)
        return x

    def _block(self, block: BasicBlock, name: str, x: _Value) -> _Value:
        """The residual addition becomes edges from both branches into one node."""
        s = self.trace(block.sn1, f"{name}.sn1", self.trace(block.conv1, f"{name}.conv1", x))
        y = self.trace(block.conv2, f"{name}.conv2", s)
        shortcut = self.trace(block.downsample, f"{name}.downsample", x)
        if block.sew:
            return _merge(self.trace(block.sn2, f"{name}.sn2", y), shortcut, name)
        return self.trace(block.sn2, f"{name}.sn2", _merge(y, shortcut, name))

    def _head(self, head: Head, name: str, x: _Value) -> _Value:
        """Global average pooling = ``AvgPool2d`` over the whole map, then ``Flatten``, hidden, ``fc``."""
        size = x.shape[1:]
        x = self.add(f"{name}.pool", _avg_pool(size, size, (0, 0)), x)
        x = self.add(f"{name}.flatten", _flatten(x.shape, 0, len(x.shape) - 1), x)
        if head.hidden is not None:
            x = self.trace(head.hidden, f"{name}.hidden", x)
        return self.trace(head.fc, f"{name}.fc", x)

    def graph(self, x: _Value, metadata: dict[str, Any]) -> nir.NIRGraph:
        """The recorded nodes with ``output`` fed by ``x``."""
        self.add("output", nir.Output(np.array(x.shape)), x)
        return nir.NIRGraph(nodes=self.nodes, edges=self.edges, metadata=metadata)


def _avg_pool_to_nir(pool: nn.AvgPool2d, name: str) -> nir.AvgPool2d:
    """``nn.AvgPool2d`` -> ``nir.AvgPool2d`` (floor mode, padding counted in the mean)."""
    if pool.ceil_mode or pool.divisor_override is not None or (
            not pool.count_include_pad and _pair_of(pool.padding) != (0, 0)):
        raise ValueError(f"layer {name!r} (AvgPool2d) uses ceil_mode, divisor_override or "
                         "count_include_pad=False, which NIR's AvgPool2d cannot express")
    kernel = _pair_of(pool.kernel_size)
    return _avg_pool(kernel, _pair_of(pool.stride if pool.stride is not None else kernel), _pair_of(pool.padding))


def _adaptive_pool_to_nir(pool: nn.AdaptiveAvgPool2d, name: str, shape: tuple[int, ...]) -> nir.AvgPool2d:
    """``nn.AdaptiveAvgPool2d`` -> ``nir.AvgPool2d`` when its windows tile the map exactly."""
    size = shape[-2:]
    out = tuple(s if o is None else o for s, o in zip(size, _pair_of(pool.output_size)))
    if any(s % o for s, o in zip(size, out)):
        raise ValueError(f"layer {name!r} (AdaptiveAvgPool2d) maps {size[0]}x{size[1]} to {out[0]}x{out[1]}: "
                         "windows of unequal size, which NIR's AvgPool2d cannot express")
    kernel = tuple(s // o for s, o in zip(size, out))
    return _avg_pool(kernel, kernel, (0, 0))


def _flatten_to_nir(flatten: nn.Flatten, name: str, shape: tuple[int, ...], flat: bool) -> nir.Flatten:
    """``nn.Flatten`` on ``[T*B, ...]`` (inside ``SeqToANN``) or ``[T, B, ...]`` -> per-step dims."""
    lead = 1 if flat else 2
    dims = []
    for d in (flatten.start_dim, flatten.end_dim):
        d = d - lead if d >= 0 else d + len(shape)
        if not 0 <= d < len(shape):
            where = "[T*B, ...] (inside SeqToANN)" if flat else "[T, B, ...]"
            raise ValueError(f"layer {name!r} (Flatten) flattens dims {flatten.start_dim}..{flatten.end_dim} "
                             f"of {where}, which reaches the time or batch dimension")
        dims.append(d)
    return _flatten(shape, *dims)


def _flatten(shape: tuple[int, ...], start: int, end: int) -> nir.Flatten:
    """``nir.Flatten`` of the per-step dims ``start..end``, written as negative dims: NIR's dims
    exclude the batch, and negative ones mean the same whether an importer adds a batch
    dimension (SpikingJelly, nirtorch) or hands them to ``torch.nn.Flatten`` as they are (snnTorch)."""
    n = len(shape)
    return nir.Flatten({"input": np.array(shape)}, start_dim=start - n, end_dim=end - n)


def _pair_of(value: int | tuple[int, ...] | None) -> tuple[int, int]:
    return (value, value) if isinstance(value, int) or value is None else tuple(value)


def _input_shape(model: nn.Module, input_size: int | tuple[int, int] | None,
                 input_shape: tuple[int, ...] | None) -> tuple[int, ...]:
    """Per-step shape of one sample: a registry model's ``(C, H, W)`` (``input_size`` = ``(H, W)``,
    default 28x28 for one channel, else 32x32), or a user network's ``input_shape``."""
    if input_shape is not None:
        if input_size is not None:
            raise ValueError("pass input_size (H, W) or input_shape (C, H, W), not both")
        shape = tuple(input_shape) if isinstance(input_shape, (tuple, list, torch.Size)) else None
        if not shape or not all(isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in shape):
            raise ValueError(f"input_shape must be the per-step shape of one sample, such as (1, 28, 28) "
                             f"or (784,), got {input_shape!r}")
        if isinstance(model, SpikingNet) and (len(shape) != 3 or shape[0] != model.in_channels):
            raise ValueError(f"input_shape must be ({model.in_channels}, H, W) for this model, got {shape}")
        return shape
    if not isinstance(model, SpikingNet):
        raise ValueError(f"to_nir needs input_shape= for a {type(model).__name__}: the per-step shape of "
                         "one sample without time and batch, such as (1, 28, 28)")
    if input_size is None:
        return (model.in_channels, *((28, 28) if model.in_channels == 1 else (32, 32)))
    size = (input_size, input_size) if isinstance(input_size, int) else tuple(input_size)
    if len(size) != 2 or not all(isinstance(s, int) and s > 0 for s in size):
        raise ValueError(f"input_size must be a positive int or (H, W), got {input_size!r}")
    return (model.in_channels, *size)


_ENCODING_TEXT = {"direct": "direct encoding: the static image is repeated at each of the T steps",
                  "poisson": "Poisson encoding: at each step, spikes drawn with the pixel values as probabilities"}


def _metadata(model: nn.Module, encoder: _Encoder | None, dt: float) -> dict[str, Any]:
    """What the graph alone cannot say: the step, the encoding and how to read the output."""
    meta: dict[str, Any] = {"dt": float(dt)}
    if encoder is not None:
        encoding = next(key for key, kind in ENCODERS.items() if isinstance(encoder, kind))
        meta.update(time_steps=int(encoder.T), encoding=encoding, input=_ENCODING_TEXT[encoding])
    else:
        meta["input"] = "a sequence: one input per time step (the network has no encoder)"
    if isinstance(model, SpikingNet):
        meta["output"] = "per-step logits; the prediction is the argmax of their mean over the T steps"
        name = str(model.config.get("name", ""))
    else:
        meta["output"] = "the last layer's per-step output"
        name = type(model).__name__
    meta.update({
        "spike_condition": "spike when v >= v_threshold, then v = v_reset in the same step",
        "discretisation": "forward Euler with step dt, input held constant over the step",
        "generator": f"spikegrad {__version__}", "model": name,
    })
    return meta


class NIRDtWarning(UserWarning):
    """An export whose ``dt`` other simulators' NIR importers will not assume."""


def _check_dt(dt: Any, warn: bool) -> float:
    if not (isinstance(dt, (int, float)) and not isinstance(dt, bool) and dt > 0 and math.isfinite(dt)):
        raise ValueError(f"dt must be a positive number, got {dt!r}")
    if warn and not math.isclose(dt, DEFAULT_DT, rel_tol=1e-9):
        warnings.warn(NIRDtWarning(
            f"NIR export with dt={dt:g}: snnTorch's importer assumes dt=1e-4 and will silently "
            f"misread the neurons (SpikingJelly's needs import_from_nir(..., dt={dt:g})); "
            "the default dt=1e-4 is read correctly by both"), stacklevel=3)
    return float(dt)


def to_nir(model: nn.Module, dt: float = DEFAULT_DT, *, input_size: int | tuple[int, int] | None = None,
           input_shape: tuple[int, ...] | None = None) -> nir.NIRGraph:
    """The NIR graph of a spiking network, batch norm folded (``fold_bn``).

    ``model``: a registry model (``create_model``; per-step input ``[C, H, W]`` with
    ``input_size`` = ``(H, W)``, default 28x28 for one channel, else 32x32), or your own
    network of spikegrad layers in ``nn.Sequential`` containers (``SeqToANN`` around
    stateless layers, ``LIF``/``IF``/``PLIF``, ``nn.Linear``, optionally an encoder
    first), with ``input_shape`` its per-step input shape of one sample, e.g. ``(1, 28, 28)``.

    ``dt``: the step the continuous-time neuron parameters are written for. The default,
    1e-4, is what snnTorch's and SpikingJelly's importers assume; any other value warns
    (``NIRDtWarning``), since snnTorch would silently misread it. A layer NIR cannot
    express raises one ``ValueError`` naming it.
    """
    if not isinstance(model, nn.Module):
        raise ValueError(f"to_nir takes a spiking network (an nn.Module), got {type(model).__name__}")
    if isinstance(model, ShortcutNet):
        raise ValueError("to_nir takes the inference model; for a ShortcutNet call its export() "
                         "first (net.export())")
    dt = _check_dt(dt, warn=True)
    shape = _input_shape(model, input_size, input_shape)
    tracer = _Tracer(dt)
    tracer.nodes["input"] = nir.Input(np.array(shape))
    out = tracer.trace(fold_bn(model), "", _Value(("input",), shape))
    if not any(isinstance(node, (nir.LIF, nir.IF)) for node in tracer.nodes.values()):
        raise ValueError(f"{type(model).__name__} has no spiking neuron (LIF, IF, PLIF): nothing for NIR to simulate")
    return tracer.graph(out, _metadata(model, tracer.encoder, dt))


def export_nir(model: nn.Module, path: str | Path, dt: float = DEFAULT_DT, *,
               input_size: int | tuple[int, int] | None = None,
               input_shape: tuple[int, ...] | None = None) -> Path:
    """Write ``to_nir(model, dt, ...)`` to ``path`` (HDF5, ``nir.write``) atomically.

    The graph is built first, so a refused layer leaves no file; the file is written to
    a temporary name in the same folder, fsynced, then renamed over ``path``.
    """
    graph = to_nir(model, dt, input_size=input_size, input_shape=input_shape)
    return atomic_write(path, lambda tmp: nir.write(tmp, graph))


# ------------------------------------------------------------------------- import
class _InputMap(nn.Module):
    """``x * gain + shift`` elementwise: a NIR neuron's input scaling our neurons lack."""

    def __init__(self, gain: float, shift: float) -> None:
        super().__init__()
        self.gain, self.shift = gain, shift

    def forward(self, x: Tensor) -> Tensor:
        """Any shape -> same shape."""
        return x * self.gain + self.shift

    def extra_repr(self) -> str:
        return f"gain={self.gain}, shift={self.shift}"


class _Flatten(nn.Module):
    """NIR ``Flatten`` (dims of one step's ``[...]``) on a sequence ``[T, B, ...]``."""

    def __init__(self, start_dim: int, end_dim: int) -> None:
        super().__init__()
        self.start_dim, self.end_dim = (d + 2 if d >= 0 else d for d in (int(start_dim), int(end_dim)))

    def forward(self, x: Tensor) -> Tensor:
        """``[T, B, ...]`` -> ``[T, B, ...']`` with the per-step dims flattened."""
        return x.flatten(self.start_dim, self.end_dim)


class _SumPool2d(nn.AvgPool2d):
    """Sum pooling: average pooling with divisor 1; ``[N, C, H, W]`` -> ``[N, C, H', W']``."""

    def forward(self, x: Tensor) -> Tensor:
        """``[N, C, H, W]`` -> window sums ``[N, C, H', W']``."""
        return F.avg_pool2d(x, self.kernel_size, self.stride, self.padding, divisor_override=1)


def _close(a: float, b: float) -> bool:
    return math.isclose(a, b, rel_tol=_REL_TOL)


def _scalars(name: str, node: nir.NIRNode, fields: tuple[str, ...]) -> dict[str, float]:
    """One value per field (spikegrad neurons are uniform per layer); the node's exact
    float64 metadata wins when it agrees with the array to float32 precision."""
    exact = node.metadata.get("float64", {}) if isinstance(node.metadata, dict) else {}
    out = {}
    for field in fields:
        values = np.unique(np.asarray(getattr(node, field), dtype=np.float64))
        if values.size != 1:
            raise ValueError(f"NIR node {name!r}: {field} takes {values.size} different values; "
                             "spikegrad neurons take one value per layer")
        value = float(values[0])
        hint = exact.get(field)
        out[field] = float(hint) if hint is not None and _close(float(hint), value) else value
    return out


def _with_gain(neuron: BaseNeuron, gain: float, shift: float) -> nn.Module:
    """``neuron`` fed ``x * gain + shift`` (just ``neuron`` when that is ``x``)."""
    if _close(gain, 1.0) and shift == 0.0:
        return neuron
    return nn.Sequential(OrderedDict(input=_InputMap(gain, shift), neuron=neuron))


def _spiking(name: str, tau_steps: float, gain: float, v_leak: float, v_threshold: float,
             v_reset: float) -> nn.Module:
    """A spikegrad neuron stepping ``h = v + (v_leak - v) / tau_steps + gain * x``, fire, reset.

    ``tau_steps = inf`` is IF. ``decay_input`` is chosen when it makes the step exact
    (``gain`` 1: False, ``gain = 1/tau_steps``: True), else an input map is added.
    """
    if not tau_steps >= 1:
        raise ValueError(f"NIR node {name!r}: tau/dt = {tau_steps:.4g} is below 1 step; "
                         "pass the dt the graph was written for")
    common = {"v_threshold": v_threshold, "v_reset": v_reset, "backend": "auto"}
    if math.isinf(tau_steps):
        return _with_gain(IF(**common), gain, 0.0)
    if v_leak == v_reset and _close(gain, 1.0):
        return LIF(tau=tau_steps, decay_input=False, **common)
    if v_leak == v_reset and _close(gain, 1.0 / tau_steps):
        return LIF(tau=tau_steps, decay_input=True, **common)
    return _with_gain(LIF(tau=tau_steps, decay_input=False, **common), gain, (v_leak - v_reset) / tau_steps)


def _lif_module(name: str, node: nir.LIF, dt: float) -> nn.Module:
    """Euler step of ``tau dv/dt = v_leak - v + r I``: leak ``dt/tau``, input gain ``r dt/tau``."""
    p = _scalars(name, node, ("tau", "r", "v_leak", "v_threshold", "v_reset"))
    return _spiking(name, p["tau"] / dt, p["r"] * dt / p["tau"], p["v_leak"], p["v_threshold"], p["v_reset"])


def _if_module(name: str, node: nir.IF, dt: float) -> nn.Module:
    """Euler step of ``dv/dt = r I``: input gain ``r dt``, no leak."""
    p = _scalars(name, node, ("r", "v_threshold", "v_reset"))
    return _spiking(name, math.inf, p["r"] * dt, p["v_reset"], p["v_threshold"], p["v_reset"])


def _cuba_lif_module(name: str, node: nir.CubaLIF, dt: float) -> nn.Module:
    """CubaLIF maps only with ``tau_syn = dt``: the synaptic current is then ``w_in S`` with no
    memory (snnTorch's ``Synaptic`` with ``alpha = 0``); a slower synapse is a second state."""
    p = _scalars(name, node, ("tau_syn", "tau_mem", "r", "v_leak", "v_threshold", "v_reset", "w_in"))
    if not _close(p["tau_syn"], dt):
        raise ValueError(f"NIR node {name!r} is a CubaLIF with tau_syn = {p['tau_syn']:.4g} != dt = {dt:.4g}: "
                         f"its synaptic current decays over steps (alpha = {1 - dt / p['tau_syn']:.4g}), "
                         "a second state spikegrad's neurons do not have; only tau_syn = dt maps")
    gain = p["w_in"] * p["r"] * dt / p["tau_mem"]
    return _spiking(name, p["tau_mem"] / dt, gain, p["v_leak"], p["v_threshold"], p["v_reset"])


def _pair(value: Any) -> tuple[int, int] | str:
    """A NIR size/stride/padding (int, array or 'same'/'valid') as torch takes it."""
    if isinstance(value, (str, bytes)):
        return value.decode() if isinstance(value, bytes) else value
    items = [int(v) for v in np.atleast_1d(value)]
    return (items[0], items[0]) if len(items) == 1 else tuple(items)


def _conv_module(name: str, node: nir.Conv2d, dt: float) -> nn.Module:
    """``nir.Conv2d`` -> ``nn.Conv2d`` run on ``[T*B, ...]``."""
    weight = torch.as_tensor(np.asarray(node.weight), dtype=torch.get_default_dtype())
    conv = nn.Conv2d(weight.shape[1] * int(node.groups), weight.shape[0], tuple(weight.shape[2:]),
                     stride=_pair(node.stride), padding=_pair(node.padding), dilation=_pair(node.dilation),
                     groups=int(node.groups))
    _load(conv, weight, node.bias)
    return SeqToANN(conv)


def _linear(weight: np.ndarray, bias: np.ndarray | None) -> nn.Linear:
    """``nir.Affine``/``nir.Linear`` -> ``nn.Linear`` (acts on the last dim of ``[T, B, N]``)."""
    w = torch.as_tensor(np.asarray(weight), dtype=torch.get_default_dtype())
    layer = nn.Linear(w.shape[1], w.shape[0], bias=bias is not None)
    _load(layer, w, bias)
    return layer


@torch.no_grad()
def _load(layer: nn.Module, weight: Tensor, bias: np.ndarray | None) -> None:
    """Copy NIR's ``weight`` (and ``bias``) into ``layer``'s parameters."""
    layer.weight.copy_(weight)
    if bias is not None:
        layer.bias.copy_(torch.as_tensor(np.asarray(bias), dtype=weight.dtype))


def _pool_module(kind: type[nn.AvgPool2d]) -> Callable[[str, nir.NIRNode, float], nn.Module]:
    """The importer of a NIR pooling node as ``kind`` run on ``[T*B, ...]``."""
    def build(name: str, node: nir.NIRNode, dt: float) -> nn.Module:
        return SeqToANN(kind(_pair(node.kernel_size), _pair(node.stride), _pair(node.padding)))
    return build


_IMPORTERS: dict[type, Callable[[str, Any, float], nn.Module]] = {
    nir.Affine: lambda name, node, dt: _linear(node.weight, node.bias),
    nir.Linear: lambda name, node, dt: _linear(node.weight, None),
    nir.Conv2d: _conv_module,
    nir.Flatten: lambda name, node, dt: _Flatten(node.start_dim, node.end_dim),
    nir.AvgPool2d: _pool_module(nn.AvgPool2d),
    nir.SumPool2d: _pool_module(_SumPool2d),
    nir.LIF: _lif_module,
    nir.IF: _if_module,
    nir.CubaLIF: _cuba_lif_module,
}


def _module(name: str, node: nir.NIRNode, dt: float) -> nn.Module:
    """The spikegrad layer of one NIR node; an unknown type is refused, naming the node."""
    build = _IMPORTERS.get(type(node))
    if build is None:
        supported = ", ".join(["Input", "Output", *(t.__name__ for t in _IMPORTERS)])
        raise ValueError(f"NIR node {name!r} has type {type(node).__name__}, which spikegrad cannot "
                         f"import; supported: {supported}")
    return build(name, node, dt)


def _topological(graph: nir.NIRGraph) -> list[str]:
    """Node names in an order where every node comes after its inputs; cycles are refused."""
    pending = {name: sum(dst == name for _, dst in graph.edges) for name in graph.nodes}
    order = [name for name, n in pending.items() if n == 0]
    for name in order:
        for src, dst in graph.edges:
            if src == name:
                pending[dst] -= 1
                if pending[dst] == 0:
                    order.append(dst)
    if len(order) < len(graph.nodes):
        stuck = sorted(set(graph.nodes) - set(order))
        raise ValueError(f"NIR graph has recurrent edges (a cycle through {', '.join(map(repr, stuck[:4]))}); "
                         "spikegrad imports feed-forward graphs only")
    return order


def _single(graph: nir.NIRGraph, kind: type) -> str:
    names = [name for name, node in graph.nodes.items() if isinstance(node, kind)]
    if len(names) != 1:
        raise ValueError(f"a NIR graph needs exactly one {kind.__name__} node, found {len(names)}: {names}")
    return names[0]


def _key(name: str) -> str:
    """A node name as a ``ModuleDict`` key (no dots)."""
    return name.replace(".", "_")


class NIRNet(nn.Module):
    """A NIR graph run by spikegrad layers: ``forward(x)`` -> per-step output ``[T, B, ...]``.

    ``x`` is a sequence ``[T, B, *input_shape]``, or, when the graph's metadata names
    ``time_steps`` and an ``encoding`` (spikegrad files do), a static ``[B, *input_shape]``
    that is encoded to ``[T, B, ...]`` as the exporting model did. A node with several
    inputs gets their sum. Attributes: ``input_shape``, ``T`` (or None), ``dt``,
    ``metadata`` and ``nodes`` (NIR node name -> layer, in execution order);
    ``layer_name`` maps a sub-module name back to its NIR node name.
    """

    def __init__(self, graph: nir.NIRGraph, dt: float) -> None:
        super().__init__()
        self.input_name, self.output_name = _single(graph, nir.Input), _single(graph, nir.Output)
        order = [name for name in _topological(graph) if name not in (self.input_name, self.output_name)]
        self.layers = nn.ModuleDict({_key(name): _module(name, graph.nodes[name], dt) for name in order})
        if len(self.layers) != len(order):
            raise ValueError("NIR node names collide once dots become underscores; rename the nodes")
        self.order = order
        self.sources = {name: [src for src, dst in graph.edges if dst == name] for name in graph.nodes}
        self.input_shape = tuple(int(s) for s in graph.nodes[self.input_name].input_type["input"])
        self.dt, self.metadata = dt, dict(graph.metadata)
        T, encoding = self.metadata.get("time_steps"), self.metadata.get("encoding")
        self.T = int(T) if T is not None else None
        self.encoder = ENCODERS[str(encoding)](self.T) if self.T and str(encoding) in ENCODERS else None

    @property
    def nodes(self) -> dict[str, nn.Module]:
        """NIR node name -> its spikegrad layer, in execution order."""
        return {name: self.layers[_key(name)] for name in self.order}

    def layer_name(self, module_name: str) -> str:
        """The NIR node name (for spikegrad's files: the exported model's own layer name) of a
        sub-module name of this net, e.g. ``layers.stage1_sn1`` or ``layers.stage1_sn1.neuron``
        -> ``stage1.sn1``; a name outside ``layers`` is returned as it is."""
        parts = module_name.split(".")
        by_key = {_key(name): name for name in self.order}
        if len(parts) > 1 and parts[0] == "layers" and parts[1] in by_key:
            return by_key[parts[1]]
        return module_name

    def _sequence(self, x: Tensor) -> Tensor:
        """``x`` as ``[T, B, *input_shape]``."""
        if x.dim() == len(self.input_shape) + 1 and self.encoder is not None:
            x = self.encoder.encode(x)
        if x.dim() != len(self.input_shape) + 2 or tuple(x.shape[2:]) != self.input_shape:
            static = f" or [B, {', '.join(map(str, self.input_shape))}]" if self.encoder is not None else ""
            raise ValueError(f"input must be [T, B, {', '.join(map(str, self.input_shape))}]{static}, "
                             f"got shape {tuple(x.shape)}")
        return x

    def forward(self, x: Tensor) -> Tensor:
        """``[T, B, *input_shape]`` (or static ``[B, *input_shape]``) -> ``[T, B, *output_shape]``."""
        values = {self.input_name: self._sequence(x)}
        for name in self.order:
            values[name] = self.layers[_key(name)](self._inputs(name, values))
        return self._inputs(self.output_name, values)

    def _inputs(self, name: str, values: dict[str, Tensor]) -> Tensor:
        """The sum of the outputs feeding ``name``, in edge order."""
        return functools.reduce(torch.add, [values[src] for src in self.sources[name]])


def _read(source: nir.NIRGraph | str | Path) -> nir.NIRGraph:
    if isinstance(source, nir.NIRGraph):
        return source
    path = Path(source)
    if not path.is_file():
        raise ValueError(f"NIR file {str(path)!r} does not exist")
    try:
        return nir.read(path)
    except (OSError, KeyError, ValueError, TypeError, AssertionError) as err:
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise ValueError(f"{str(path)!r} is not a readable NIR file: {reason}") from None


def from_nir(graph_or_path: nir.NIRGraph | str | Path, dt: float | None = None) -> NIRNet:
    """A runnable spikegrad model (``NIRNet``, eval mode) from a NIR graph or ``.nir`` file.

    ``dt``: the step to discretise the continuous-time neurons with; default the graph's
    ``metadata["dt"]`` (spikegrad writes it; snnTorch's graphs assume ``dt=1e-4``).
    Supported nodes: Input, Output, Affine, Linear, Conv2d, Flatten, AvgPool2d,
    SumPool2d, LIF, IF and CubaLIF with ``tau_syn = dt``; anything else raises one
    ``ValueError`` naming the node. Neurons use ``spikegrad.neuron`` (backend ``auto``).
    """
    graph = _read(graph_or_path)
    if dt is None:
        if "dt" not in (graph.metadata or {}):
            raise ValueError("the NIR graph states no dt in its metadata; pass dt= "
                             "(graphs written by snnTorch assume dt=1e-4)")
        dt = float(graph.metadata["dt"])
    if not (dt > 0 and math.isfinite(dt)):
        raise ValueError(f"dt must be a positive number, got {dt!r}")
    return NIRNet(graph, float(dt)).eval()

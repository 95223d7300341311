"""Building blocks of spiking networks: time flattening, encoders, neurons, conv stacks, heads.

Time is the leading dimension: spiking tensors are ``[T, B, ...]``. Stateless layers
(conv, BN, pooling) run once on ``[T*B, ...]`` through ``SeqToANN``; only neurons
see the time axis. Linear layers act on the last dimension, so they take ``[T, B, C]``
as they are.
"""
from __future__ import annotations

import os
from collections import OrderedDict
from typing import Any, Callable, NamedTuple, Sequence

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from . import defaults
from .kernels import spike_conv
from .memory import BatchNorm2d, is_spikes, relayout
from .neuron import IF, LIF, PLIF, BaseNeuron
from .registry import Registry
from .surrogate import Surrogate

__all__ = [
    "flatten_time", "unflatten_time", "SeqToANN", "DirectEncoder", "PoissonEncoder", "ENCODERS",
    "NEURON_DEFAULTS", "NEURONS", "NeuronEntry", "neuron_config", "make_neuron", "ClampReLU",
    "neuron_layers", "Conv2d", "cpu_kind", "CHANNELS_LAST_MIN_PIXELS", "UNSAFE_1X1_MAX_IN_CHANNELS",
    "channels_last_is_safe", "compile_model", "ConvBN", "conv_bn", "AvgPool2x2",
    "SpikingConvStack", "spiking_conv_stack", "Head",
]


def flatten_time(x: Tensor) -> Tensor:
    """``[T, B, ...]`` -> ``[T*B, ...]`` (a view when ``x`` allows it)."""
    return x.flatten(0, 1)


def unflatten_time(x: Tensor, T: int) -> Tensor:
    """``[T*B, ...]`` -> ``[T, B, ...]``."""
    return x.unflatten(0, (T, -1))


class SeqToANN(nn.Sequential):
    """Stateless modules run once on the flattened sequence: ``[T, B, ...]`` -> ``[T, B, ...']``.

    Takes what ``nn.Sequential`` takes (modules, or one ``OrderedDict`` of named ones),
    so its ``state_dict`` keys are those of the wrapped modules.
    """

    def forward(self, x: Tensor) -> Tensor:
        """``x: [T, B, ...]`` -> the modules applied to ``[T*B, ...]``, reshaped to ``[T, B, ...']``."""
        return unflatten_time(super().forward(flatten_time(x)), x.shape[0])


class _Encoder(nn.Module):
    """Static images ``[B, C, H, W]`` -> ``[T, B, C, H, W]``; event data ``[T, B, C, H, W]`` passes."""

    def __init__(self, T: int) -> None:
        super().__init__()
        if not isinstance(T, int) or isinstance(T, bool) or T < 1:
            raise ValueError(f"T must be a positive integer, got {T!r}")
        self.T = T

    def forward(self, x: Tensor) -> Tensor:
        """``[B, C, H, W]`` -> encoded ``[T, B, C, H, W]``; ``[T, B, C, H, W]`` is returned as is."""
        if x.dim() == 5:
            if x.shape[0] != self.T:
                raise ValueError(f"event input has {x.shape[0]} time steps, the model expects T={self.T} "
                                 f"(shape {tuple(x.shape)})")
            return x
        if x.dim() != 4:
            raise ValueError(f"input must be [B, C, H, W] (static) or [T, B, C, H, W] (events), "
                             f"got shape {tuple(x.shape)}")
        return self.encode(x)

    def encode(self, x: Tensor) -> Tensor:
        """``[B, C, H, W]`` -> ``[T, B, C, H, W]``."""
        raise NotImplementedError

    def extra_repr(self) -> str:
        return f"T={self.T}"


class DirectEncoder(_Encoder):
    """Direct (analog) encoding: the same image at every step, as a stride-0 view (no copy)."""

    def encode(self, x: Tensor) -> Tensor:
        return x.unsqueeze(0).expand(self.T, *x.shape)


class PoissonEncoder(_Encoder):
    """Rate encoding: ``s[t] ~ Bernoulli(x)`` independently per step; ``x`` must lie in [0, 1].

    Draws from the global torch generator, so ``torch.manual_seed`` makes it repeatable.
    """

    def encode(self, x: Tensor) -> Tensor:
        low, high = torch.aminmax(x)
        if low < 0 or high > 1:
            raise ValueError(f"Poisson encoding needs inputs in [0, 1] (spike probabilities), got values "
                             f"in [{float(low):.4g}, {float(high):.4g}]; do not normalise the images")
        noise = torch.rand((self.T, *x.shape), dtype=x.dtype, device=x.device)
        return (noise < x).to(x.dtype)


ENCODERS: dict[str, type[_Encoder]] = {"direct": DirectEncoder, "poisson": PoissonEncoder}

# every neuron type takes these keys (the run configuration's ``neuron`` section)
NEURON_DEFAULTS: dict[str, Any] = dict(defaults.NEURON)


class NeuronEntry(NamedTuple):
    """A registered neuron type: ``build(cfg, surrogate) -> module`` (``cfg`` the full,
    validated dict) and ``extra(cfg)``, the keys only this type takes with their defaults."""

    build: Callable[[dict, Surrogate], nn.Module]
    extra: Callable[[dict], dict] = lambda cfg: {}


NEURONS: Registry[NeuronEntry] = Registry("neuron type")


def neuron_config(cfg: dict | None = None) -> dict[str, Any]:
    """``cfg`` over ``NEURON_DEFAULTS`` (and the type's own defaults), validated; a new dict.

    Every type accepts the keys of ``NEURON_DEFAULTS`` (so switching ``type`` in a config
    works; IF ignores ``tau`` and ``decay_input``, ``relu``/``clamp`` ignore all of them);
    ``plif`` also takes ``init_tau`` (default: ``tau``), ``clamp`` takes ``clamp_max`` (2.0).
    """
    if cfg is not None and not isinstance(cfg, dict):
        raise ValueError(f"neuron must be a dict like {NEURON_DEFAULTS}, got {cfg!r}")
    merged = {**NEURON_DEFAULTS, **(cfg or {})}
    kind = merged["type"]
    extra = NEURONS.get(kind).extra(merged)
    unknown = sorted(set(merged) - set(NEURON_DEFAULTS) - set(extra))
    if unknown:
        allowed = ", ".join([*NEURON_DEFAULTS, *extra])
        raise ValueError(f"neuron type {kind!r}: unknown key(s) {', '.join(unknown)}; expected any of {allowed}")
    return {**extra, **merged}


class ClampReLU(nn.Module):
    """The ANN twin's activation, elementwise on any shape (``[T, B, ...]`` too).

    ``clamp_max=None``: ReLU; otherwise ReLU clamped to ``[0, clamp_max]``.
    """

    def __init__(self, clamp_max: float | None = None) -> None:
        super().__init__()
        if clamp_max is not None and not (isinstance(clamp_max, (int, float)) and clamp_max > 0):
            raise ValueError(f"clamp_max must be a positive number, got {clamp_max!r}")
        self.clamp_max = None if clamp_max is None else float(clamp_max)

    def forward(self, x: Tensor, residual: Tensor | None = None) -> Tensor:
        """``x (+ residual)`` clamped to ``[0, clamp_max]`` (same shape); ``residual`` as in
        the spiking neurons' ``forward``."""
        return torch.clamp(x if residual is None else x + residual, min=0.0, max=self.clamp_max)

    def extra_repr(self) -> str:
        return f"clamp_max={self.clamp_max}"


def make_neuron(neuron_cfg: dict | None, surrogate: Surrogate) -> nn.Module:
    """A neuron module ``[T, B, ...] -> [T, B, ...]`` of a registered type (``NEURONS``) from a
    config dict (see ``neuron_config``).

    Spiking types use ``surrogate`` itself (not a copy), so one object serves a whole model.
    """
    cfg = neuron_config(neuron_cfg)
    return NEURONS.get(cfg["type"]).build(cfg, surrogate)


def _spiking(cfg: dict, surrogate: Surrogate) -> dict[str, Any]:
    """The arguments every spiking neuron takes, from a neuron config."""
    return {"v_threshold": cfg["v_threshold"], "v_reset": cfg["v_reset"], "detach_reset": cfg["detach_reset"],
            "surrogate": surrogate, "backend": cfg["backend"]}


NEURONS.register("lif", NeuronEntry(
    lambda cfg, sg: LIF(tau=cfg["tau"], decay_input=cfg["decay_input"], **_spiking(cfg, sg))))
NEURONS.register("if", NeuronEntry(lambda cfg, sg: IF(decay_input=False, **_spiking(cfg, sg))))
NEURONS.register("plif", NeuronEntry(
    lambda cfg, sg: PLIF(init_tau=cfg["init_tau"], decay_input=cfg["decay_input"], **_spiking(cfg, sg)),
    lambda cfg: {"init_tau": cfg["tau"]}))
NEURONS.register("relu", NeuronEntry(lambda cfg, sg: ClampReLU(None)))
NEURONS.register("clamp", NeuronEntry(lambda cfg, sg: ClampReLU(cfg["clamp_max"]), lambda cfg: {"clamp_max": 2.0}))


def neuron_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """``(name, module)`` of every neuron (or ANN-twin activation) in ``model``, in registration order."""
    return [(name, m) for name, m in model.named_modules() if isinstance(m, (BaseNeuron, ClampReLU))]


def cpu_kind() -> str:
    """The vector instruction set oneDNN's convolutions run on here: ``"avx512"``,
    ``"avx2"`` (AMD hosts, older Intel ones, or ``ONEDNN_MAX_CPU_ISA`` set to an AVX2 level)
    or ``"other"`` (no AVX2, or not x86)."""
    capability = torch.backends.cpu.get_cpu_capability()  # ATen's: "AVX512", "AVX2", "DEFAULT", ...
    limit = os.environ.get("ONEDNN_MAX_CPU_ISA", "").upper()
    if capability == "AVX512" and (not limit or limit == "ALL" or limit.startswith("AVX512")
                                   or limit.startswith("AVX10")):
        return "avx512"
    if capability in ("AVX512", "AVX2") and (not limit or "AVX" in limit):
        return "avx2"
    return "other"


# Smallest map (pixels) run channels-last, by CPU kind: on AVX-512 oneDNN's channels-last
# convolutions win from 8x8 up and lose below (512 channels at 4x4: 1.48x contiguous); on
# AVX2 they win down to 4x4 and tie at 2x2 (docs/performance.md,
# "CPU kinds: AVX2 and AVX-512"); elsewhere (not measured) the AVX-512 rule
CHANNELS_LAST_MIN_PIXELS = {"avx512": 64, "avx2": 16, "other": 64}


# oneDNN 3.x (inside torch 2.13) corrupts the heap in the channels-last weight gradient of
# strided 1x1 convolutions with 2 to 7 input channels on AVX2 CPUs; the margin covers a
# 16-float SIMD width (docs/performance.md, "Convolutions oneDNN must not run channels-last")
UNSAFE_1X1_MAX_IN_CHANNELS = 15


def channels_last_is_safe(conv: nn.Conv2d) -> bool:
    """Whether oneDNN may run ``conv`` channels-last on a CPU: False for strided 1x1
    convolutions of at most ``UNSAFE_1X1_MAX_IN_CHANNELS`` input channels."""
    strided_1x1 = tuple(conv.kernel_size) == (1, 1) and tuple(conv.stride) != (1, 1)
    return not (strided_1x1 and conv.in_channels <= UNSAFE_1X1_MAX_IN_CHANNELS)


class Conv2d(nn.Conv2d):
    """``nn.Conv2d`` on ``[N, C, H, W]`` that, when ``channels_last`` (``create_model`` sets it),
    runs channels-last on CPU maps of at least ``CHANNELS_LAST_MIN_PIXELS[cpu_kind()]``
    pixels and contiguous on smaller ones; the output keeps that layout. Same parameters
    and values.

    A convolution oneDNN cannot run channels-last safely (``channels_last_is_safe``) runs
    contiguous on CPU whatever the flag and the input's layout.

    When the input is spikes (a neuron marked them, ``memory.is_spikes``), ``spike_conv``
    (``"auto"``, ``"on"`` or ``"off"``; ``create_model`` sets it) decides whether the forward
    and the weight gradient are computed from the active inputs instead
    (``kernels.spike_conv``: same values to float32 rounding, faster at low spike density).
    """

    channels_last = False
    spike_conv = "auto"

    def forward(self, x: Tensor) -> Tensor:
        """``[N, C_in, H, W]`` -> ``[N, C_out, H', W']``."""
        if x.device.type != "cpu" or x.dim() != 4:
            return super().forward(x)
        plan = self._spike_plan(x)
        if plan is not None:
            return spike_conv.conv2d(x, self.weight, self.bias, self.stride, self.padding, self.dilation, plan)
        if not channels_last_is_safe(self):
            weight = self.weight.contiguous()  # oneDNN goes channels-last if either operand is
            return self._conv_forward(relayout(x, torch.contiguous_format), weight, self.bias)
        if self.channels_last:
            large = x.shape[-2] * x.shape[-1] >= _MIN_PIXELS
            x = relayout(x, torch.channels_last if large else torch.contiguous_format)
        return super().forward(x)

    def _spike_plan(self, x: Tensor) -> spike_conv.Plan | None:
        """The spike path's plan for input ``x`` (``spike_conv.plan_for``), or None: not spikes,
        grouped, non-zero padding, compiling, autocast, or a convolution oneDNN must run contiguous."""
        if (self.spike_conv == "off" or self.groups != 1 or self.padding_mode != "zeros"
                or isinstance(self.padding, str) or torch.compiler.is_compiling()
                or torch.is_autocast_enabled(x.device.type)
                or not channels_last_is_safe(self) or not is_spikes(x)):
            return None
        return spike_conv.plan_for(x, self.weight, self.spike_conv, _KIND)


_KIND = cpu_kind()  # this machine's, read once at import
_MIN_PIXELS = CHANNELS_LAST_MIN_PIXELS[_KIND]


def compile_model(model: nn.Module, **kwargs: Any) -> nn.Module:
    """``torch.compile(model, **kwargs)`` with inductor's layout optimisation off: on CPU it
    would run every convolution channels-last, the unsafe ones too; spikegrad's ``Conv2d``
    layers choose each convolution's layout instead. Same call and outputs as the model."""
    options = {"layout_optimization": False, **kwargs.pop("options", {})}
    return torch.compile(model, options=options, **kwargs)


class ConvBN(SeqToANN):
    """``conv_bn``'s module: ``[T, B, C_in, H, W]`` -> ``[T, B, C_out, H', W']``, a conv (child
    ``conv``) then, unless built with ``norm="none"``, a batch norm (child ``bn``)."""

    def fire(self, neuron: nn.Module, x: Tensor, residual: Tensor | None = None) -> Tensor:
        """``neuron(self(x), residual=residual)``, with the batch norm handed to a spiking
        neuron (``norm=``), which folds it into its loop on the fused backends in training
        (the normalised tensor is never written). ``[T, B, C_in, H, W]`` -> ``[T, B, C_out, H', W']``."""
        kwargs = {} if residual is None else {"residual": residual}
        if "bn" not in self._modules or not isinstance(neuron, BaseNeuron):
            return neuron(self(x), **kwargs)
        return neuron(unflatten_time(self.conv(flatten_time(x)), x.shape[0]), norm=self.bn, **kwargs)


def conv_bn(in_channels: int, out_channels: int, kernel_size: int = 3, stride: int = 1,
            norm: str = "bn") -> ConvBN:
    """``[T, B, C_in, H, W]`` -> ``[T, B, C_out, H/stride, W/stride]``: a same-padded conv, then BN.

    Children ``conv`` and ``bn`` (``memory.BatchNorm2d``: saves its output, which the
    neuron after it saves too; ``ConvBN.fire`` lets the neuron fold it); with
    ``norm="none"`` only ``conv``, which then has a bias.
    """
    conv = Conv2d(in_channels, out_channels, kernel_size, stride, kernel_size // 2, bias=norm == "none")
    parts = [("conv", conv)] + ([("bn", BatchNorm2d(out_channels))] if norm == "bn" else [])
    return ConvBN(OrderedDict(parts))


class AvgPool2x2(nn.Module):
    """2x2 average pooling of ``[N, C, H, W]``, skipped (identity) once a side is below 2."""

    def forward(self, x: Tensor) -> Tensor:
        """``[N, C, H, W]`` -> ``[N, C, H//2, W//2]`` (or ``x`` when ``min(H, W) < 2``)."""
        return x if min(x.shape[-2:]) < 2 else F.avg_pool2d(x, 2)


class SpikingConvStack(nn.Sequential):
    """``spiking_conv_stack``'s module: its children in order, each ``ConvBN`` firing the
    neuron that follows it (``ConvBN.fire``). ``[T, B, C_in, H, W]`` -> ``[T, B, C_out, H', W']``."""

    def forward(self, x: Tensor) -> Tensor:
        """``x: [T, B, C_in, H, W]`` -> spikes ``[T, B, C_out, H', W']``."""
        children = iter(self)
        for module in children:
            x = module.fire(next(children), x) if isinstance(module, ConvBN) else module(x)
        return x


def spiking_conv_stack(in_channels: int, widths: Sequence[int], neuron: Callable[[], nn.Module], *,
                       norm: str = "bn", stride: int = 1, kernel_size: int = 3,
                       pool: bool = False) -> SpikingConvStack:
    """``[pool ->] (conv -> BN -> neuron) x len(widths)``, the first conv with ``stride``.

    ``[T, B, C_in, H, W]`` -> spikes ``[T, B, widths[-1], H', W']``. Children: ``pool``
    (``AvgPool2x2``, when asked), then ``conv1``, ``sn1``, ``conv2``, ``sn2``, ...;
    ``neuron()`` makes each new neuron.
    """
    parts: list[tuple[str, nn.Module]] = [("pool", SeqToANN(AvgPool2x2()))] if pool else []
    for i, width in enumerate(widths, start=1):
        parts.append((f"conv{i}", conv_bn(in_channels, width, kernel_size, stride if i == 1 else 1, norm)))
        parts.append((f"sn{i}", neuron()))
        in_channels = width
    return SpikingConvStack(OrderedDict(parts))


class Head(nn.Module):
    """Classifier: global average pooling over space, an optional hidden part, one linear layer.

    ``[T, B, C, H, W]`` -> per-step logits ``[T, B, num_classes]``. ``hidden`` (if given)
    maps ``[T, B, C]`` to ``[T, B, features]``; without it ``features`` is ``C``.
    """

    def __init__(self, features: int, num_classes: int, hidden: nn.Module | None = None) -> None:
        super().__init__()
        self.hidden = hidden
        self.fc = nn.Linear(features, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        """``x: [T, B, C, H, W]`` -> ``[T, B, num_classes]``."""
        x = x.sum(dim=(-2, -1)) / (x.shape[-2] * x.shape[-1])  # mean's values; its backward is
        # a broadcast view instead of a new tensor laid out contiguous whatever x's layout
        return self.fc(x if self.hidden is None else self.hidden(x))

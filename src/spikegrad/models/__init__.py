"""The model registry: ``create_model(name, num_classes=10, **kw)`` and ``list_models()``.

Names (lowercase): ``resnet18``, ``resnet19``, ``resnet20``, ``resnet34``, ``vgg11``,
``vgg16``, ``vggsnn``, ``cifarnet`` (the MSG paper's CIFAR net), ``ltl-vgg11`` (the LTL
paper's VGG-11) and ``plain-N`` for N in 8..40. Shapes and stages: each builder's
docstring; every model is a ``SpikingNet`` (see there for its attributes). Register your own with
``MODELS.register("mynet", ModelEntry(builder, {}))``: ``builder(ctx, **options)`` gets a
``base.Context`` and returns a ``base.Body``, like the builders here.
"""
from __future__ import annotations

import difflib
import functools
from typing import Any, Callable, NamedTuple

from .. import surrogate as sg
from ..kernels.spike_conv import MODES as SPIKE_CONV_MODES
from ..layers import ENCODERS, Conv2d, neuron_config
from ..neuron import BACKENDS
from ..registry import Registry
from . import cifarnet, ltl_vgg, plain, resnet, vgg
from .base import Body, Context, SpikingNet, init_gain, init_weights

__all__ = ["create_model", "list_models", "MODELS", "ModelEntry", "SpikingNet", "NORMS"]

NORMS = ("bn", "none")
_RESNET_OPTIONS = {"stem": "cifar", "sew": False}


class ModelEntry(NamedTuple):
    """A registered model: ``builder(ctx, **options) -> Body`` and the options it takes
    (beyond ``create_model``'s common arguments) with their defaults."""

    builder: Callable[..., Body]
    options: dict[str, Any]


MODELS: Registry[ModelEntry] = Registry("model")
for _name, _builder in {"resnet18": resnet.resnet18, "resnet19": resnet.resnet19,
                        "resnet20": resnet.resnet20, "resnet34": resnet.resnet34}.items():
    MODELS.register(_name, ModelEntry(_builder, _RESNET_OPTIONS))
for _arch in vgg.VGG_STAGES:
    MODELS.register(_arch, ModelEntry(functools.partial(vgg.vgg, arch=_arch), {}))
MODELS.register("cifarnet", ModelEntry(cifarnet.cifarnet, {}))
MODELS.register("ltl-vgg11", ModelEntry(ltl_vgg.ltl_vgg11, {}))
for _depth in plain.DEPTHS:
    MODELS.register(f"plain-{_depth}", ModelEntry(functools.partial(plain.plain, depth=_depth), {}))

_COMMON = ("num_classes", "T", "in_channels", "encoding", "neuron", "surrogate", "norm", "width", "backend",
           "channels_last", "spike_conv")


def list_models() -> list[str]:
    """Every name ``create_model`` accepts (``MODELS``), ``plain-N`` in the order of N."""
    return sorted(MODELS.names(), key=lambda n: (n.startswith("plain-"), len(n) if n.startswith("plain-") else 0, n))


def _entry(key: Any) -> ModelEntry:
    """``MODELS.get(key)``, its error listing ``plain-N`` once rather than every depth."""
    if key in MODELS:
        return MODELS.get(key)
    fixed = [n for n in list_models() if not n.startswith("plain-")]
    depths = f"{plain.DEPTHS.start}..{plain.DEPTHS.stop - 1}"
    close = difflib.get_close_matches(str(key), MODELS.names(), n=1)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    raise ValueError(f"unknown model {key!r}{hint} (expected one of {', '.join(fixed)}, "
                     f"or plain-N with N in {depths})")


def _positive_int(what: str, value: Any) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{what} must be a positive integer, got {value!r}")
    return value


def _choice(what: str, value: Any, options: Any) -> str:
    if value not in options:
        raise ValueError(f"{what} must be one of {', '.join(options)}, got {value!r}")
    return value


def _neuron_backend(neuron_cfg: dict, backend: str) -> dict:
    """The neuron config the layers get: the model's ``backend`` fills a neuron backend of ``auto``."""
    own = neuron_cfg["backend"]
    if own != "auto" and backend != "auto" and own != backend:
        raise ValueError(f"backend {backend!r} conflicts with neuron.backend {own!r}; set one of them")
    return {**neuron_cfg, "backend": backend if own == "auto" else own}


def create_model(name: str, num_classes: int = 10, *, T: int = 4, in_channels: int = 3,
                 encoding: str = "direct", neuron: dict | None = None,
                 surrogate: sg.Surrogate | str | dict | None = None, norm: str = "bn", width: float = 1.0,
                 backend: str = "auto", channels_last: bool = True, spike_conv: str = "auto",
                 **options: Any) -> SpikingNet:
    """Build a registry model (see ``list_models()``) returning logits ``[T, B, num_classes]``.

    ``T`` time steps; ``encoding`` ``"direct"`` or ``"poisson"`` for static ``[B, C, H, W]``
    inputs (``[T, B, C, H, W]`` event inputs pass through); ``neuron`` a dict over
    ``layers.NEURON_DEFAULTS``; ``surrogate`` an object (shared by every neuron, used as
    is), a name, a ``surrogate.create`` dict, or None for ATan(alpha=2); ``norm`` ``"bn"`` or
    ``"none"`` (convs then get a bias); ``width`` multiplies every channel count;
    ``backend`` the neurons' backend (fills ``neuron["backend"]`` when that is ``auto``);
    ``channels_last`` runs the convolutions of CPU maps of at least 8x8 channels-last
    (``layers.Conv2d``; same values and ``state_dict``, faster on CPU: docs/performance.md);
    ``spike_conv`` (``"auto"``, ``"on"``, ``"off"``) whether CPU convolutions of spike inputs
    compute their forward and weight gradient from the active inputs (``kernels.spike_conv``;
    ``"auto"``: where measured faster at the input's spike density).
    ResNets also take ``stem`` (``"cifar"``, default, or ``"imagenet"``) and ``sew`` (False).
    Any bad name or argument raises one ``ValueError``.
    """
    key = name.lower() if isinstance(name, str) else name
    builder, defaults = _entry(key)
    unknown = sorted(set(options) - set(defaults))
    if unknown:
        raise ValueError(f"{key}: unknown argument(s) {', '.join(unknown)}; expected any of "
                         f"{', '.join([*_COMMON, *defaults])}")
    _positive_int("num_classes", num_classes)
    _positive_int("T", T)
    _positive_int("in_channels", in_channels)
    _choice("encoding", encoding, tuple(ENCODERS))
    _choice("norm", norm, NORMS)
    _choice("backend", backend, BACKENDS)
    if not isinstance(channels_last, bool):
        raise ValueError(f"channels_last must be true or false, got {channels_last!r}")
    _choice("spike_conv", spike_conv, SPIKE_CONV_MODES)
    if not isinstance(width, (int, float)) or isinstance(width, bool) or not width > 0:
        raise ValueError(f"width must be a positive number, got {width!r}")
    neuron_cfg, sur = neuron_config(neuron), sg.resolve(surrogate)
    options = {**defaults, **options}
    ctx = Context(in_channels, num_classes, norm, float(width), _neuron_backend(neuron_cfg, backend), sur)
    config = {"name": key, "num_classes": num_classes, "T": T, "in_channels": in_channels,
              "encoding": encoding, "neuron": neuron_cfg, "surrogate": sur.config(), "norm": norm,
              "width": float(width), "backend": backend, "channels_last": channels_last, "spike_conv": spike_conv, **options}
    model = SpikingNet(builder(ctx, **options), encoding, T, in_channels, num_classes, sur, config)
    init_weights(model, init_gain(norm, neuron_cfg))
    for conv in model.modules():
        if isinstance(conv, Conv2d):
            conv.channels_last, conv.spike_conv = channels_last, spike_conv
    return model

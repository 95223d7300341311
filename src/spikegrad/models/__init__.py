"""The model registry: ``create_model(name, num_classes=10, **kw)`` and ``list_models()``.

Names (lowercase): ``resnet18``, ``resnet19``, ``resnet20``, ``resnet34``, ``vgg11``,
``vgg16``, ``vggsnn``, ``cifarnet`` (the MSG paper's CIFAR net) and ``plain-N`` for N in
8..40. Shapes and stages: each builder's docstring; every model is a ``SpikingNet`` (see
there for its attributes).
"""
from __future__ import annotations

import functools
import re
from typing import Any, Callable

from .. import surrogate as sg
from ..layers import ENCODERS, Conv2d, neuron_config
from ..neuron import BACKENDS
from . import cifarnet, plain, resnet, vgg
from .base import Body, Context, SpikingNet, init_gain, init_weights

__all__ = ["create_model", "list_models", "SpikingNet", "NORMS"]

NORMS = ("bn", "none")
_RESNET_OPTIONS = {"stem": "cifar", "sew": False}
# name -> (builder(ctx, **options), the options it takes with their defaults)
_FIXED: dict[str, tuple[Callable[..., Body], dict[str, Any]]] = {
    "resnet18": (resnet.resnet18, _RESNET_OPTIONS),
    "resnet19": (resnet.resnet19, _RESNET_OPTIONS),
    "resnet20": (resnet.resnet20, _RESNET_OPTIONS),
    "resnet34": (resnet.resnet34, _RESNET_OPTIONS),
    **{arch: (functools.partial(vgg.vgg, arch=arch), {}) for arch in vgg.VGG_STAGES},
    "cifarnet": (cifarnet.cifarnet, {}),
}
_COMMON = ("num_classes", "T", "in_channels", "encoding", "neuron", "surrogate", "norm", "width", "backend",
           "channels_last")


def list_models() -> list[str]:
    """Every name ``create_model`` accepts (``plain-8`` ... ``plain-40`` spelled out)."""
    return sorted(_FIXED) + [f"plain-{n}" for n in plain.DEPTHS]


def _lookup(name: str) -> tuple[str, Callable[..., Body], dict[str, Any]]:
    """``(canonical name, builder, its options with defaults)``."""
    key = name.lower() if isinstance(name, str) else name
    if key in _FIXED:
        return key, *_FIXED[key]
    match = re.fullmatch(r"plain-(\d+)", key) if isinstance(key, str) else None
    if match and int(match[1]) in plain.DEPTHS:
        return key, functools.partial(plain.plain, depth=int(match[1])), {}
    depths = f"{plain.DEPTHS.start}..{plain.DEPTHS.stop - 1}"
    raise ValueError(f"unknown model {name!r}; expected one of {', '.join(sorted(_FIXED))}, "
                     f"or plain-N with N in {depths}")


def _positive_int(what: str, value: Any) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{what} must be a positive integer, got {value!r}")
    return value


def _choice(what: str, value: Any, options: Any) -> str:
    if value not in options:
        raise ValueError(f"{what} must be one of {', '.join(options)}, got {value!r}")
    return value


def _surrogate(spec: sg.Surrogate | dict | None) -> sg.Surrogate:
    """The model's one surrogate: as given, ``surrogate.create(**spec)``, or ATan(alpha=2)."""
    if spec is None:
        return sg.ATan(alpha=2.0)
    if isinstance(spec, sg.Surrogate):
        return spec
    if isinstance(spec, dict) and "name" in spec:
        return sg.create(**spec)
    raise ValueError(f"surrogate must be a Surrogate, a dict with a 'name' (one of {', '.join(sg.names())}) "
                     f"or None, got {spec!r}")


def _neuron_backend(neuron_cfg: dict, backend: str) -> dict:
    """The neuron config the layers get: the model's ``backend`` fills a neuron backend of ``auto``."""
    own = neuron_cfg["backend"]
    if own != "auto" and backend != "auto" and own != backend:
        raise ValueError(f"backend {backend!r} conflicts with neuron.backend {own!r}; set one of them")
    return {**neuron_cfg, "backend": backend if own == "auto" else own}


def create_model(name: str, num_classes: int = 10, *, T: int = 4, in_channels: int = 3,
                 encoding: str = "direct", neuron: dict | None = None,
                 surrogate: sg.Surrogate | dict | None = None, norm: str = "bn", width: float = 1.0,
                 backend: str = "auto", channels_last: bool = True, **options: Any) -> SpikingNet:
    """Build a registry model (see ``list_models()``) returning logits ``[T, B, num_classes]``.

    ``T`` time steps; ``encoding`` ``"direct"`` or ``"poisson"`` for static ``[B, C, H, W]``
    inputs (``[T, B, C, H, W]`` event inputs pass through); ``neuron`` a dict over
    ``layers.NEURON_DEFAULTS``; ``surrogate`` an object (shared by every neuron, used as
    is), a ``surrogate.create`` dict, or None for ATan(alpha=2); ``norm`` ``"bn"`` or
    ``"none"`` (convs then get a bias); ``width`` multiplies every channel count;
    ``backend`` the neurons' backend (fills ``neuron["backend"]`` when that is ``auto``);
    ``channels_last`` runs the convolutions of CPU maps of at least 8x8 channels-last
    (``layers.Conv2d``; same values and ``state_dict``, faster on CPU: docs/performance.md).
    ResNets also take ``stem`` (``"cifar"``, default, or ``"imagenet"``) and ``sew`` (False).
    Any bad name or argument raises one ``ValueError``.
    """
    key, builder, defaults = _lookup(name)
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
    if not isinstance(width, (int, float)) or isinstance(width, bool) or not width > 0:
        raise ValueError(f"width must be a positive number, got {width!r}")
    neuron_cfg, sur = neuron_config(neuron), _surrogate(surrogate)
    options = {**defaults, **options}
    ctx = Context(in_channels, num_classes, norm, float(width), _neuron_backend(neuron_cfg, backend), sur)
    config = {"name": key, "num_classes": num_classes, "T": T, "in_channels": in_channels,
              "encoding": encoding, "neuron": neuron_cfg, "surrogate": sur.config(), "norm": norm,
              "width": float(width), "backend": backend, "channels_last": channels_last, **options}
    model = SpikingNet(builder(ctx, **options), encoding, T, in_channels, num_classes, sur, config)
    init_weights(model, init_gain(norm, neuron_cfg))
    for conv in model.modules():
        if isinstance(conv, Conv2d):
            conv.channels_last = channels_last
    return model

"""The peer libraries' networks: ``create_model``'s network with the peer's own layers in it.

``peer_model(peer, name, ...)`` builds the registry model ``name`` contiguous
(``channels_last=False``), then swaps in the peer's parts, keeping every weight's value:

- ``"spikingjelly"``: every conv + batch norm (``layers.ConvBN``) becomes SpikingJelly's
  ``layer.Conv2d`` and ``layer.BatchNorm2d``, and every spiking neuron its
  ``neuron.LIFNode``, all ``step_mode="m"``: the whole network runs once on
  ``[T, B, ...]``, after ``functional.reset_net`` (a forward pre-hook), as in
  SpikingJelly's multi-step examples.
- ``"snntorch"``: ``nn.Conv2d`` and ``nn.BatchNorm2d``, and ``snntorch.Leaky``
  (``init_hidden=True``, beta = 1 - 1/tau); the model is built for T = 1 and
  ``PerStep`` calls it once per time step, as snnTorch's tutorials loop over time.

Only the layers change: the stages, shortcuts, pooling and head are the registry model's
own, so the parameters (names, shapes, values) are those of spikegrad's network. The
neurons must be LIF with an ATan surrogate (the benchmark's), whose options are read from
``model.config``; snnTorch takes a hard reset to 0 or a soft reset and input that is not
decayed, and always detaches the reset from the gradient.
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Any, Callable

import torch
from torch import Tensor, nn

from spikegrad.layers import ConvBN, neuron_layers
from spikegrad.models import SpikingNet, create_model

__all__ = ["PEERS", "peer_model", "PeerNeuron", "PeerConvBN", "PerStep", "lif_options", "spikingjelly_lif",
           "snntorch_leaky"]

PEERS = ("spikingjelly", "snntorch")


def lif_options(model: SpikingNet) -> dict[str, Any]:
    """The LIF options of ``model``'s neurons (``tau``, ``v_threshold``, ``v_reset``,
    ``decay_input``, ``detach_reset``) and its ATan's ``alpha``, from ``model.config``."""
    neuron, surrogate = model.config["neuron"], model.config["surrogate"]
    if neuron["type"] != "lif" or surrogate["name"] != "atan":
        raise ValueError(f"peer networks take LIF neurons with an ATan surrogate, got neuron type "
                         f"{neuron['type']!r} and surrogate {surrogate['name']!r}")
    options = {key: neuron[key] for key in ("tau", "v_threshold", "v_reset", "decay_input", "detach_reset")}
    return {**options, "alpha": surrogate["alpha"]}


def spikingjelly_lif(tau: float = 2.0, v_threshold: float = 1.0, v_reset: float | None = 0.0,
                     decay_input: bool = False, detach_reset: bool = False, alpha: float = 2.0) -> nn.Module:
    """SpikingJelly's multi-step ``LIFNode`` with these options (defaults: the benchmark's)."""
    from spikingjelly.activation_based import neuron, surrogate

    return neuron.LIFNode(tau=tau, decay_input=decay_input, v_threshold=v_threshold, v_reset=v_reset,
                          detach_reset=detach_reset, surrogate_function=surrogate.ATan(alpha=alpha),
                          step_mode="m")


def snntorch_leaky(tau: float = 2.0, v_threshold: float = 1.0, v_reset: float | None = 0.0,
                   decay_input: bool = False, detach_reset: bool = False, alpha: float = 2.0) -> nn.Module:
    """snnTorch's ``Leaky`` (``init_hidden=True``: one step per call, its membrane kept on the
    module) with these options; ``detach_reset`` is ignored (snnTorch always detaches)."""
    import snntorch
    from snntorch import surrogate

    if decay_input or v_reset not in (0.0, None):
        raise ValueError(f"snnTorch's Leaky takes undecayed input and a reset to 0 or by subtraction, "
                         f"got decay_input={decay_input}, v_reset={v_reset}")
    return snntorch.Leaky(beta=1.0 - 1.0 / tau, threshold=v_threshold, spike_grad=surrogate.atan(alpha=alpha),
                          init_hidden=True, reset_mechanism="zero" if v_reset == 0.0 else "subtract")


class PeerNeuron(nn.Module):
    """A peer's neuron in a spikegrad neuron's place: ``forward(x, residual=None)`` is
    ``node(x + residual)``, shapes as the peer's ``node`` takes them."""

    def __init__(self, node: nn.Module) -> None:
        super().__init__()
        self.node = node

    def forward(self, x: Tensor, residual: Tensor | None = None) -> Tensor:
        return self.node(x if residual is None else x + residual)


class PeerConvBN(nn.Sequential):
    """A peer's conv (child ``conv``) and batch norm (``bn``, unless the model has none) in a
    ``layers.ConvBN``'s place. ``time_major``: the children take ``[T, B, ...]`` themselves
    (SpikingJelly's multi-step layers); otherwise they run on ``[T*B, ...]`` (a view for the
    ``[1, B, ...]`` of a per-step model). ``fire`` is ``ConvBN.fire`` for any neuron."""

    def __init__(self, modules: OrderedDict[str, nn.Module], time_major: bool) -> None:
        super().__init__(modules)
        self.time_major = time_major

    def forward(self, x: Tensor) -> Tensor:
        """``[T, B, C_in, H, W]`` -> ``[T, B, C_out, H', W']``."""
        if self.time_major:
            return super().forward(x)
        return super().forward(x.flatten(0, 1)).unflatten(0, x.shape[:2])

    def fire(self, neuron: nn.Module, x: Tensor, residual: Tensor | None = None) -> Tensor:
        """``neuron(self(x), residual=residual)``."""
        return neuron(self(x)) if residual is None else neuron(self(x), residual=residual)


class PerStep(nn.Module):
    """A T = 1 registry model called once per time step, with ``SpikingNet``'s interface
    (``stages``, ``all_stages``, ``stage_channels``, ``num_classes``, ``in_channels``, ``T``,
    ``forward(x, return_stages)``), so ``ShortcutNet`` wraps it as it wraps the model.

    ``reset()`` runs before every forward (snnTorch: each ``Leaky``'s ``reset_mem``).
    ``x``: ``[B, C, H, W]`` (the same image every step) or ``[T, B, C, H, W]``; logits
    ``[T, B, num_classes]`` (and stage outputs ``[T, B, C_l, H_l, W_l]``), the steps'
    outputs concatenated.
    """

    def __init__(self, model: SpikingNet, T: int, reset: Callable[[nn.Module], None]) -> None:
        super().__init__()
        if model.T != 1:
            raise ValueError(f"PerStep runs a model built for T=1, got T={model.T}")
        self.model, self.T, self._reset = model, T, reset
        for name in ("stages", "all_stages", "stage_channels", "num_classes", "in_channels"):
            setattr(self, name, getattr(model, name))

    def forward(self, x: Tensor, return_stages: bool = False) -> Tensor | tuple[Tensor, list[Tensor]]:
        self._reset(self.model)
        steps = [self.model(x[t] if x.dim() == 5 else x, return_stages=True) for t in range(self.T)]
        logits = torch.cat([out for out, _ in steps])
        if not return_stages:
            return logits
        return logits, [torch.cat(stage) for stage in zip(*(outputs for _, outputs in steps))]


def _set(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent), child, module)


def _swap(model: SpikingNet, conv_bn: Callable[[ConvBN], PeerConvBN], node: Callable[[], nn.Module]) -> None:
    """Every ``ConvBN`` of ``model`` -> ``conv_bn(it)`` (the values copied), every spiking neuron
    -> ``PeerNeuron(node())``; then no spikegrad layer with a fast path of its own is left."""
    for name, module in [(n, m) for n, m in model.named_modules() if isinstance(m, ConvBN)]:
        peer = conv_bn(module)
        peer.load_state_dict(module.state_dict())
        _set(model, name, peer)
    for name, _ in neuron_layers(model):
        _set(model, name, PeerNeuron(node()))
    kinds = (nn.modules.conv._ConvNd, nn.modules.batchnorm._BatchNorm)
    left = [n for n, m in model.named_modules() if isinstance(m, kinds) and type(m).__module__.startswith("spikegrad")]
    if left:  # a conv or batch norm outside a ConvBN: the swap above does not know that model
        raise ValueError(f"{model.config['name']}: the peer networks cannot replace its layers {', '.join(left)}")
    model.compact_spikes = False  # spikegrad's bit-packing of saved spikes is not the peers'


def _spikingjelly(module: ConvBN) -> PeerConvBN:
    from spikingjelly.activation_based import layer

    c = module.conv
    parts = [("conv", layer.Conv2d(c.in_channels, c.out_channels, c.kernel_size, c.stride, c.padding,
                                   bias=c.bias is not None, step_mode="m"))]
    if "bn" in module._modules:
        parts.append(("bn", layer.BatchNorm2d(module.bn.num_features, eps=module.bn.eps,
                                              momentum=module.bn.momentum, step_mode="m")))
    return PeerConvBN(OrderedDict(parts), time_major=True)


def _torch(module: ConvBN) -> PeerConvBN:
    c = module.conv
    parts = [("conv", nn.Conv2d(c.in_channels, c.out_channels, c.kernel_size, c.stride, c.padding,
                                bias=c.bias is not None))]
    if "bn" in module._modules:
        parts.append(("bn", nn.BatchNorm2d(module.bn.num_features, eps=module.bn.eps, momentum=module.bn.momentum)))
    return PeerConvBN(OrderedDict(parts), time_major=False)


def _reset_spikingjelly(model: nn.Module, args: Any) -> None:
    from spikingjelly.activation_based import functional

    functional.reset_net(model)  # SpikingJelly keeps each neuron's membrane on the module


def _reset_snntorch(model: nn.Module) -> None:
    import snntorch

    for m in model.modules():
        if isinstance(m, snntorch.Leaky):
            m.reset_mem()


def peer_model(peer: str, name: str, num_classes: int = 10, *, T: int = 4, **kwargs: Any) -> nn.Module:
    """``peer``'s network of ``create_model(name, num_classes, T=T, **kwargs)`` (built contiguous):
    ``[B, C, H, W]`` -> logits ``[T, B, num_classes]``; ``forward(x, return_stages=True)``
    as ``SpikingNet``'s. See the module docstring."""
    if peer not in PEERS:
        raise ValueError(f"unknown peer {peer!r}; expected one of {', '.join(PEERS)}")
    kwargs = {**kwargs, "channels_last": False}
    if peer == "spikingjelly":
        model = create_model(name, num_classes, T=T, **kwargs)
        options = lif_options(model)
        _swap(model, _spikingjelly, lambda: spikingjelly_lif(**options))
        model.register_forward_pre_hook(_reset_spikingjelly)
        return model
    model = create_model(name, num_classes, T=1, **kwargs)
    options = lif_options(model)
    _swap(model, _torch, lambda: snntorch_leaky(**options))
    return PerStep(model, T, _reset_snntorch)

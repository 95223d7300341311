"""Diagnostics of any spiking model: per-layer gradient norms, firing rates, synaptic operations.

Works on any ``nn.Module`` built from spikegrad neurons (``neuron.BaseNeuron``: spikes
``[T, B, ...]`` in and out) and convolution / linear layers (run on ``[T*B, ...]``).
Nothing here changes a model's outputs; the hook-based monitors remove their hooks on
``remove()`` or when their ``with`` block ends:

    >>> norms = grad_norms(model)                # after loss.backward()
    >>> with FiringRates(model) as fr, SynapticOps(model) as ops:
    ...     model(x)
    >>> fr.rates(), ops.summary()

"The layers" of the gradient-norm figure are the weight layers (``WEIGHT_LAYERS``) in
definition order (``model.named_modules()``), which is forward order for the registry's
models: shallow to deep.
"""
from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn

from .neuron import BaseNeuron

__all__ = [
    "WEIGHT_LAYERS", "layer_names", "grad_norms", "first_layer_grad_norm",
    "FiringRates", "SynapticOps", "energy",
]

WEIGHT_LAYERS = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)

# Energy per operation, 32-bit float, 45 nm (Horowitz, ISSCC 2014), the SNN papers' usual figures.
E_AC_PJ = 0.9
E_MAC_PJ = 4.6


def _weight_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    return [(name, m) for name, m in model.named_modules() if isinstance(m, WEIGHT_LAYERS)]


def layer_names(model: nn.Module) -> list[str]:
    """Names of the weight layers (Conv1d/2d/3d, Linear) of ``model``, shallow to deep."""
    return [name for name, _ in _weight_layers(model)]


def grad_norms(model: nn.Module) -> dict[str, float]:
    """L2 norm of each weight layer's ``weight.grad``, keyed by layer name, shallow to deep.

    Layers whose weight has no gradient (frozen, or not used in the last backward) are left out.
    """
    grads = {name: m.weight.grad for name, m in _weight_layers(model) if m.weight.grad is not None}
    if not grads:
        return {}
    norms = torch.stack([torch.linalg.vector_norm(g.detach().float()) for g in grads.values()])
    return dict(zip(grads, norms.tolist()))  # one device sync for all layers


def first_layer_grad_norm(model: nn.Module) -> float | None:
    """L2 norm of the first weight layer's ``weight.grad``; ``None`` if it has no gradient."""
    layers = _weight_layers(model)
    grad = layers[0][1].weight.grad if layers else None
    return None if grad is None else float(torch.linalg.vector_norm(grad.detach().float()))


class _Hooks:
    """Owns forward hooks; ``remove()`` (or leaving the ``with`` block) takes them all off."""

    def __init__(self) -> None:
        self._handles: list[torch.utils.hooks.RemovableHandle] = []

    def __enter__(self):
        return self

    def __exit__(self, *exc: Any) -> None:
        self.remove()

    def remove(self) -> None:
        """Remove every hook; the values gathered so far stay readable."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()


def _spikes(output: Tensor | tuple[Tensor, Tensor]) -> Tensor:
    """A neuron's spikes ``[T, B, ...]`` from its output (``(spikes, v)`` with ``return_state``)."""
    return output[0] if isinstance(output, tuple) else output


class FiringRates(_Hooks):
    """Mean firing rate (spikes per neuron per time step) of every neuron layer, over batches.

    Hooks every ``BaseNeuron`` of ``model``; each forward adds the sum of its spikes
    ``[T, B, ...]`` (detached, kept on the device: no sync per batch) and their count.
    ``rates()`` divides the two, so batches weigh by their size; ``overall()`` divides
    all spikes by all outputs: the mean over layers weighted by their number of neurons.
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self._sums: dict[str, Tensor] = {}
        self._counts: dict[str, int] = {}
        self._neurons: dict[str, int] = {}
        for name, module in model.named_modules():
            if isinstance(module, BaseNeuron):
                self._handles.append(module.register_forward_hook(self._hook(name)))

    def _hook(self, name: str):
        def hook(module: nn.Module, args: tuple, output: Any) -> None:
            spikes = _spikes(output).detach()
            total = spikes.sum(dtype=torch.float32)
            self._sums[name] = self._sums[name] + total if name in self._sums else total
            self._counts[name] = self._counts.get(name, 0) + spikes.numel()
            self._neurons[name] = math.prod(spikes.shape[2:])
        return hook

    def rates(self) -> dict[str, float]:
        """``{neuron layer name: mean firing rate}`` of the layers that ran since the last reset."""
        return {name: s / self._counts[name] for name, s in zip(self._sums, self._spikes())}

    def overall(self) -> float | None:
        """All spikes over all neuron outputs since the last reset (layers weighted by their
        size); None when no neuron layer ran."""
        return sum(self._spikes()) / sum(self._counts.values()) if self._sums else None

    def _spikes(self) -> list[float]:
        """Each layer's spike total, in ``_sums`` order (one device sync for all layers)."""
        return torch.stack([s.cpu() for s in self._sums.values()]).tolist() if self._sums else []

    def neurons(self) -> dict[str, int]:
        """``{neuron layer name: neurons}``: elements of one sample's spikes at one time step,
        as the layer's last forward gave them."""
        return dict(self._neurons)

    def reset(self) -> None:
        """Forget everything gathered so far (the hooks stay)."""
        self._sums.clear()
        self._counts.clear()
        self._neurons.clear()


def _is_binary(x: Tensor) -> bool:
    """True when every value of ``x`` is 0 or 1 (NaN is not)."""
    return torch.equal(x, x.bool().to(x.dtype))


def _dense_macs(layer: nn.Module, x: Tensor, out: Tensor) -> int:
    """Multiply-accumulates of ``layer`` on input ``x`` giving ``out``, every input counted."""
    if isinstance(layer, nn.Linear):
        return x.numel() * layer.out_features
    return out.numel() * (layer.in_channels // layer.groups) * math.prod(layer.kernel_size)


def _accumulates(layer: nn.Module, spikes: Tensor) -> float:
    """Exact accumulates of ``layer`` on 0/1 ``spikes``: one per (input spike, weight it meets).

    Linear: nonzero inputs × out_features. Convolution ``spikes: [N, C, *spatial]``: the spikes of
    each group are summed over channels, convolved with an all-ones kernel under the layer's own
    stride, padding (and padding mode), dilation and groups, summed, × output channels per group;
    so zero padding and the borders are exact, not a firing-rate estimate.
    """
    if isinstance(layer, nn.Linear):
        return float(torch.count_nonzero(spikes)) * layer.out_features
    n, c, *spatial = spikes.shape
    groups = layer.groups
    per_group = spikes.float().reshape(n, groups, c // groups, *spatial).sum(2)
    ones = per_group.new_ones(groups, 1, *layer.kernel_size)
    hits = layer._conv_forward(per_group, ones, None)  # the layer's own geometry, weights swapped
    return float(hits.sum()) * (layer.out_channels // groups)


class SynapticOps(_Hooks):
    """Counts the operations of the weight layers over the forward passes run while hooked.

    Rule for spikes: a layer's input counts as spikes when all its values are 0 or 1 (checked
    on the actual tensor at each call, so it needs no knowledge of the architecture and treats a
    Poisson-encoded input as spikes). Its operations are then accumulates (SOPs), counted exactly
    (see ``_accumulates``). Any other input -- direct-encoded pixels, average-pooled spikes (VGG's
    pooling, global pooling before a classifier), summed spikes (SEW) -- counts as dense
    multiply-accumulates (MACs).

    Samples: each forward of ``model`` adds the batch size ``B`` its neurons saw (their input
    ``[T, B, ...]``), or the input's first dimension for a model without neurons (an ANN).
    ``T`` is read from the neurons too (1 without neurons). Meant for an evaluation pass: each
    hooked layer call synchronises with the device once.
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self._ops: dict[str, dict[str, float]] = {}  # per layer, in call order
        self._dense = 0.0
        self.samples = 0
        self.time_steps = 1
        self._batch: int | None = None
        self._handles.append(model.register_forward_pre_hook(self._start))
        self._handles.append(model.register_forward_hook(self._finish))
        for name, module in model.named_modules():
            if isinstance(module, BaseNeuron):
                self._handles.append(module.register_forward_pre_hook(self._see_neuron))
            elif isinstance(module, WEIGHT_LAYERS):
                self._handles.append(module.register_forward_hook(self._hook(name)))

    def _start(self, module: nn.Module, args: tuple) -> None:
        self._batch = None

    def _see_neuron(self, module: nn.Module, args: tuple) -> None:
        self.time_steps, self._batch = args[0].shape[:2]

    def _finish(self, module: nn.Module, args: tuple, output: Any) -> None:
        self.samples += self._batch if self._batch is not None else args[0].shape[0]

    def _hook(self, name: str):
        def hook(layer: nn.Module, args: tuple, output: Tensor) -> None:
            x = args[0].detach()
            dense = _dense_macs(layer, x, output)
            self._dense += dense
            ops = self._ops.setdefault(name, {"sops": 0.0, "macs": 0.0})
            with torch.no_grad():
                if _is_binary(x):
                    ops["sops"] += _accumulates(layer, x)
                else:
                    ops["macs"] += dense
        return hook

    def summary(self) -> dict[str, Any]:
        """Operations per sample, time summed over T.

        ``{"sops": accumulates driven by spikes, "macs": MACs on analog inputs,
        "ann_macs": MACs of the ANN twin (every layer once per sample: the dense count / T),
        "samples": samples counted, "time_steps": T,
        "per_layer": {layer name: {"sops": ..., "macs": ...}}}`` (layers in forward order).
        """
        if not self.samples:
            raise ValueError("SynapticOps saw no forward pass of the model it hooks; run one first")
        per_layer = {name: {kind: count / self.samples for kind, count in ops.items()}
                     for name, ops in self._ops.items()}
        return {"sops": sum(ops["sops"] for ops in per_layer.values()),
                "macs": sum(ops["macs"] for ops in per_layer.values()),
                "ann_macs": self._dense / self.samples / self.time_steps,
                "samples": self.samples, "time_steps": self.time_steps, "per_layer": per_layer}


def energy(ops: dict[str, Any], e_ac: float = E_AC_PJ, e_mac: float = E_MAC_PJ) -> dict[str, float]:
    """Energy per sample in picojoules from ``SynapticOps.summary()``: ``{"snn", "ann", "ratio"}``.

    ``snn = sops·e_ac + macs·e_mac``, ``ann = ann_macs·e_mac``, ``ratio = snn / ann``.
    """
    snn = ops["sops"] * e_ac + ops["macs"] * e_mac
    ann = ops["ann_macs"] * e_mac
    return {"snn": snn, "ann": ann, "ratio": snn / ann if ann else math.nan}

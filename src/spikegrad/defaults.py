"""Defaults that both the run configuration (``config``) and the layers use, written once
here and nowhere else (no torch import: the configuration is read before torch is needed).

``NEURON``: every neuron type's keys and their defaults (docs/methods.md, "Spiking
neurons"): LIF with tau 2, threshold 1, hard reset to 0, the input not decayed, the
reset not detached, the backend chosen by device.
"""
from __future__ import annotations

from types import MappingProxyType
from typing import Any, Mapping

__all__ = ["NEURON"]

NEURON: Mapping[str, Any] = MappingProxyType({
    "type": "lif", "tau": 2.0, "v_threshold": 1.0, "v_reset": 0.0,
    "decay_input": False, "detach_reset": False, "backend": "auto",
})

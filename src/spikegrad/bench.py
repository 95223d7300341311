"""Benchmarks: forward+backward time of one multi-step LIF layer per backend, side by
side with SpikingJelly in the same process (``spikegrad bench``).

Medians and interquartile ranges of timed runs after warm-up (which includes the
cold compile of the fused backend); ratios are to the reference backend's median.
"""
from __future__ import annotations

import argparse
import platform
import statistics
import time
from typing import Callable

import torch

from . import neuron, surrogate as sg

__all__ = ["time_step", "candidates", "main"]


def time_step(layer: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor,
              repeats: int, warmup: int = 3) -> list[float]:
    """Seconds of ``layer(x).backward`` per run, ``repeats`` runs after ``warmup``."""
    upstream = torch.randn_like(x)
    times = []
    for i in range(warmup + repeats):
        xi = x.clone().requires_grad_()
        start = time.perf_counter()
        (layer(xi) * upstream).sum().backward()
        if i >= warmup:
            times.append(time.perf_counter() - start)
    return times


def candidates() -> dict[str, Callable]:
    """Layers to compare, all LIF tau=2, hard reset to 0, ATan(alpha=2)."""
    layers = {f"spikegrad {b}": neuron.LIF(tau=2.0, surrogate=sg.ATan(), backend=b)
              for b in ("torch", "eager", "fused")}
    try:
        from spikingjelly.activation_based import neuron as sjn, surrogate as sjs
    except ImportError as err:
        print(f"(SpikingJelly not measured: {err})")
        return layers
    sj = sjn.LIFNode(tau=2.0, decay_input=False, surrogate_function=sjs.ATan(), step_mode="m")

    def sj_layer(x: torch.Tensor) -> torch.Tensor:
        sj.reset()  # SpikingJelly keeps membrane state on the module between calls
        return sj(x)

    layers["SpikingJelly 2.0 LIFNode (m)"] = sj_layer
    return layers


def main(args: argparse.Namespace) -> None:
    """Print the neuron table for ``args.shape`` and ``args.repeats``."""
    x = torch.randn(*args.shape) * 0.8 + 0.5
    print(f"shape {args.shape}, torch {torch.__version__}, {platform.processor() or platform.machine()}, "
          f"{torch.get_num_threads()} threads\n")
    print("| layer | median ms | IQR ms | ratio to reference |\n|---|---|---|---|")
    reference = None
    for name, layer in candidates().items():
        times = sorted(time_step(layer, x, args.repeats))
        median = statistics.median(times)
        q1, q3 = times[len(times) // 4], times[(3 * len(times)) // 4]
        reference = reference or median
        print(f"| {name} | {median * 1e3:.1f} | {(q3 - q1) * 1e3:.1f} | {median / reference:.2f} |")

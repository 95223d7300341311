"""Forward+backward time of one multi-step LIF layer, per backend and against SpikingJelly.

    .venv/bin/python benchmarks/neuron.py [--shape 4 32 64 32 32] [--repeats 20]

Prints a markdown table: median and interquartile range of ``repeats`` timed runs
(after warm-up, which includes the cold compile of the fused backend), and the
ratio of each median to the reference backend's.
"""
from __future__ import annotations

import argparse
import platform
import statistics
import time
from typing import Callable

import torch

from spikegrad import neuron, surrogate as sg


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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", type=int, nargs="+", default=[4, 32, 64, 32, 32])
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()
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


if __name__ == "__main__":
    main()

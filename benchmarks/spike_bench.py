"""``spikegrad bench spikes``: what a convolution of spikes costs, dense and on the spike path.

For every convolution of a model whose input is spikes (found by running the model once:
``memory.is_spikes`` at each ``layers.Conv2d``), at each spike density asked for: the
three products of the dense (oneDNN) convolution (forward, input gradient, weight
gradient) and the two that ``kernels.spike_conv`` computes from the active inputs
(forward, weight gradient), timed in interleaved rounds on Bernoulli spikes of that
density. Reports per shape the times and speed-ups, per density the totals over the
whole network (each shape times the number of its convolutions) and the bound "if the
two spike-side products cost density x dense", and each layer's density in the model at
initialisation. The speed-ups set ``spike_conv.MAX_DENSITY``: the report ends with the
limits this run supports for the CPU kind it ran on. Method: docs/performance.md.
"""
from __future__ import annotations

import argparse
import json
import statistics
from collections import Counter
from pathlib import Path
from typing import Any, Callable, NamedTuple

import torch
from torch import Tensor
from torch.nn import functional as F

from spikegrad import layers, memory
from spikegrad.kernels import spike_conv
from spikegrad.models import create_model

from harness import _cpu_name, time_runs  # beside this file; it imports this module only inside functions

__all__ = ["ConvShape", "spike_conv_shapes", "products", "supported_limits", "main"]


class ConvShape(NamedTuple):
    """One convolution of spikes: ``[rows, c_in, side, side]`` -> ``c_out`` channels."""

    c_in: int
    c_out: int
    side: int
    kernel: int
    stride: int
    padding: int

    def __str__(self) -> str:
        return f"{self.c_in}->{self.c_out} @{self.side} k{self.kernel}s{self.stride}"


def spike_conv_shapes(model: str, width: float, T: int, batch: int, image: int = 32
                      ) -> tuple[Counter, dict[ConvShape, float]]:
    """The shapes of ``model``'s convolutions of spikes (how many of each) and the mean spike
    density of their inputs, from one training-mode forward of a random ``[batch, 3, image,
    image]`` batch at initialisation (seeds 0, as the step benchmark's)."""
    torch.manual_seed(0)
    net = create_model(model, 10, T=T, width=width, backend="eager", spike_conv="off").train()
    seen: list[tuple[ConvShape, float]] = []

    def hook(conv: layers.Conv2d, args: tuple[Tensor, ...]) -> None:
        x = args[0]
        if memory.is_spikes(x):
            shape = ConvShape(conv.in_channels, conv.out_channels, x.shape[-1], conv.kernel_size[0],
                              conv.stride[0], conv.padding[0])
            seen.append((shape, float((x != 0).float().mean())))

    handles = [m.register_forward_pre_hook(hook) for m in net.modules() if isinstance(m, layers.Conv2d)]
    with torch.no_grad():  # the batch `spikegrad bench step` times (harness.prepare)
        net(torch.randn(batch, 3, image, image, generator=torch.Generator().manual_seed(0)))
    for h in handles:
        h.remove()
    counts = Counter(shape for shape, _ in seen)
    density = {s: statistics.mean(d for shape, d in seen if shape == s) for s in counts}
    return counts, density


def products(shape: ConvShape, rows: int, density: float) -> dict[str, Callable[[], Any]]:
    """The five products of ``shape`` on Bernoulli(``density``) spikes: dense ``forward``,
    ``input`` and ``weight`` (gradients) in the layout ``layers.Conv2d`` gives them
    (channels-last unless oneDNN must run the shape contiguous), and ``spike forward`` and
    ``spike weight``."""
    gen = torch.Generator().manual_seed(0)
    conv = torch.nn.Conv2d(shape.c_in, shape.c_out, shape.kernel, shape.stride, shape.padding, bias=False)
    layout = torch.channels_last if layers.channels_last_is_safe(conv) else torch.contiguous_format
    s = (torch.rand(rows, shape.c_in, shape.side, shape.side, generator=gen) < density).float()
    s = s.contiguous(memory_format=layout)
    w = torch.randn(shape.c_out, shape.c_in, shape.kernel, shape.kernel, generator=gen)
    w = w.contiguous(memory_format=layout)
    geo = (shape.stride, shape.padding, 1)
    grad = torch.randn_like(F.conv2d(s, w, None, *geo)).contiguous(memory_format=layout)

    def backward(mask: list[bool]) -> Callable[[], Any]:
        return lambda: torch.ops.aten.convolution_backward(grad, s, w, None, [shape.stride] * 2, [shape.padding] * 2,
                                                           [1, 1], False, [0, 0], 1, mask)
    return {"forward": lambda: F.conv2d(s, w, None, *geo), "input": backward([True, False, False]),
            "weight": backward([False, True, False]),
            "spike forward": lambda: spike_conv.forward(s, w, *geo),
            "spike weight": lambda: spike_conv.weight_grad(s, grad, w.shape, *geo)}


def measure(shapes: list[ConvShape], densities: list[float], rows: int, repeats: int) -> dict[tuple, float]:
    """Median seconds of each (shape, density, product), timed in interleaved rounds (one
    call of every product of a shape and density in turn) after one untimed call each."""
    times: dict[tuple, list[float]] = {}
    for shape in shapes:
        for density in densities:
            runs = products(shape, rows, density)
            for run in runs.values():
                time_runs(run, 0, 1)
            for _ in range(repeats):
                for name, run in runs.items():
                    times.setdefault((shape, density, name), []).extend(time_runs(run, 1, 0))
    return {key: statistics.median(values) for key, values in times.items()}


MARGIN = 1.1  # a product counts as won when it is this much faster: the spread of a run-to-run VM timing


def supported_limits(shapes: list[ConvShape], densities: list[float], t: dict[tuple, float],
                     margin: float = MARGIN) -> dict[str, float]:
    """Per product (``forward``, ``weight``), the largest measured density up to which the
    spike path was at least ``margin`` times faster than dense for every shape the rule
    can send there (kernels larger than 1x1, both channel counts >= ``spike_conv.MIN_CHANNELS``);
    0 when none, or no shape is eligible: what ``spike_conv.MAX_DENSITY`` for this CPU
    kind may be set to."""
    eligible = [s for s in shapes if spike_conv.eligible((s.kernel, s.kernel), s.c_in, s.c_out)]
    limits = {"forward": 0.0, "weight": 0.0}
    for product in limits if eligible else ():
        for d in sorted(densities):
            if not all(t[(s, d, product)] >= margin * t[(s, d, f"spike {product}")] for s in eligible):
                break
            limits[product] = d
    return limits


def report(counts: Counter, init: dict[ConvShape, float], densities: list[float], t: dict[tuple, float],
           header: str) -> str:
    """The markdown tables: per shape and density, then the network's totals and bound."""
    lines = [header, "", "| conv (count, density at init) | density | dense fwd / in-grad / w-grad ms "
             "| spike fwd / w-grad ms | fwd speed-up | w-grad speed-up |", "|---|---|---|---|---|---|"]
    for shape in counts:
        for d in densities:
            f, i, w, sf, sw = (t[(shape, d, k)] * 1e3 for k in
                               ("forward", "input", "weight", "spike forward", "spike weight"))
            lines.append(f"| {shape} (x{counts[shape]}, {init[shape]:.2f}) | {d:g} | {f:.1f} / {i:.1f} / {w:.1f} "
                         f"| {sf:.1f} / {sw:.1f} | {f / sf:.2f} | {w / sw:.2f} |")
    lines += ["", "Whole network (every convolution of spikes, each shape times its count), ms:", "",
              "| density | dense: fwd + in-grad + w-grad | bound: spike side x density | "
              "spike path (best of dense and spike per product) | dense / spike path |", "|---|---|---|---|---|"]
    for d in densities:
        def total(fn: Callable[[ConvShape], float]) -> float:
            return sum(n * fn(s) for s, n in counts.items()) * 1e3
        dense = total(lambda s: t[(s, d, "forward")] + t[(s, d, "input")] + t[(s, d, "weight")])
        bound = total(lambda s: d * (t[(s, d, "forward")] + t[(s, d, "weight")]) + t[(s, d, "input")])
        best = total(lambda s: min(t[(s, d, "forward")], t[(s, d, "spike forward")]) + t[(s, d, "input")]
                     + min(t[(s, d, "weight")], t[(s, d, "spike weight")]))
        lines.append(f"| {d:g} | {dense:.0f} | {bound:.0f} | {best:.0f} | {dense / best:.2f} |")
    limits = supported_limits(list(counts), densities, t)
    kind = layers.cpu_kind()
    lines += ["", f"Limits this run supports (`spike_conv.MAX_DENSITY[{kind!r}]`, now "
              f"{spike_conv.limits_for(kind)}): "
              f"forward {limits['forward']:g}, weight {limits['weight']:g} (the largest density measured up to "
              f"which every convolution with a kernel over 1x1 and at least {spike_conv.MIN_CHANNELS} channels "
              f"each side was at least {MARGIN:g} x faster on the spike path)."]
    return "\n".join(lines) + "\n"


def main(args: argparse.Namespace) -> str:
    """``spikegrad bench spikes``: print (and with ``args.out`` write) the report."""
    if args.repeats < 2:
        raise ValueError(f"--repeats must be at least 2, got {args.repeats}")
    if not all(0 <= d <= 1 for d in args.densities):
        raise ValueError(f"--densities must lie in [0, 1], got {args.densities}")
    if not spike_conv.available():
        raise RuntimeError("the spike-aware kernels could not be built here (no working C++ compiler)")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    counts, init = spike_conv_shapes(args.model, args.width, args.T, args.batch, args.image)
    times = measure(list(counts), args.densities, args.T * args.batch, args.repeats)
    header = (f"## Convolutions of spikes: {args.model} (width {args.width:g}), T={args.T}, batch {args.batch} "
              f"({args.T * args.batch} rows), {args.image}x{args.image} input\n\n{_cpu_name()}, CPU kind {layers.cpu_kind()}, "
              f"torch {torch.__version__}, {torch.get_num_threads()} threads; median of {args.repeats} "
              f"interleaved rounds; Bernoulli spikes, each dense product in its layer's layout.")
    text = report(counts, init, args.densities, times, header)
    print(text, end="")
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "spike_conv.md").write_text(text)
        rows = [{"shape": list(s), "count": n, "density_at_init": init[s], "density": d,
                 **{k: times[(s, d, k)] for k in ("forward", "input", "weight", "spike forward", "spike weight")}}
                for s, n in counts.items() for d in args.densities]
        (out / "spike_conv.json").write_text(json.dumps(rows, indent=1) + "\n")
    return text

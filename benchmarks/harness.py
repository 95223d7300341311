"""The benchmark harness behind ``spikegrad bench``, side by side with the peer libraries on
the same machine and in one command. ``spikegrad bench`` (the package's thin entry point)
hands its parsed arguments to ``main``; peers.py builds the peer libraries' networks.

``spikegrad bench step`` (the default): the training step (forward, backward,
optimizer) of a CIFAR-size network (ResNet-18 at batch 32 by default) for the ANN
twin, spikegrad at each T and neuron backend, SpikingJelly's multi-step network and
snnTorch's network called once per time step, with and without shortcut branches.
Every network is ``create_model``'s: the ANN twin with ReLU for its neurons, the peers
with their own neurons and layers swapped in (peers.py), so all have the same parameters.
The configurations of each T (and the ANN twin) are built in this process and timed in
interleaved rounds (one step of each in turn), so a machine whose speed drifts slows all
of them alike and the ratios stay side by side. Memory comes first, from a subprocess per
configuration, so its peak RSS is its own (RSS never goes down, and a child starts with
its parent's); on CUDA the peak is ``max_memory_allocated``.
Reports medians, spreads and the ratios SNN(T) / (T x ANN), spikegrad / peer and
shortcut / no-shortcut as a markdown table and a JSON file.

``spikegrad bench neuron``: forward+backward of one multi-step LIF layer per
backend, beside SpikingJelly's ``LIFNode``. ``spikegrad bench conv``: a 3x3
convolution per map size, contiguous against channels-last (the layout rule of
``layers.Conv2d``).

Method and recorded results: docs/performance.md.
"""
from __future__ import annotations

import argparse
import datetime
import importlib
import importlib.metadata
import importlib.util
import json
import os
import platform
import resource
import shlex
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Callable, NamedTuple

import torch
from torch import Tensor, nn

from peers import PEERS, peer_model, spikingjelly_lif
from spikegrad import losses, neuron, surrogate as sg
from spikegrad.layers import compile_model, cpu_kind
from spikegrad.models import create_model, list_models
from spikegrad.shortcut import ShortcutNet

__all__ = ["main", "neuron_main", "conv_main", "step_main", "summarize", "time_runs", "candidates", "Setup", "Case",
           "plan", "build_net", "spike_density", "training_step", "prepare", "Prepared", "measure", "time_interleaved", "worker",
           "run_isolated", "memory_isolated", "measure_memory", "LIVE_ENV", "add_ratios", "markdown",
           "DEFAULT_BACKENDS", "IMAGE", "CHANNELS", "CLASSES"]

DEFAULT_BACKENDS = ("torch", "eager", "fused")  # spikegrad's neuron backends timed by default (and triton on CUDA)
IMAGE, CHANNELS, CLASSES = 32, 3, 10  # CIFAR-size input and classes
LR, MOMENTUM, WEIGHT_DECAY, LAMBDA = 0.01, 0.9, 5e-4, 0.5  # SGD; shortcut balance coefficient
STEP_DEFAULTS = {"width": 1.0, "batch": 32, "T": [1, 2, 4, 6], "repeats": 5, "warmup": 2,
                 "threads": torch.get_num_threads()}
QUICK_DEFAULTS = {"width": 1 / 16, "batch": 2, "T": [1, 2], "repeats": 2, "warmup": 1, "threads": 1}
# a memory subprocess: this directory on its path, then ``worker``
_WORKER = (f"import sys; sys.path.insert(0, {str(Path(__file__).resolve().parent)!r}); "
           "from harness import worker; worker(sys.argv[1])")


def summarize(times: list[float]) -> dict[str, float]:
    """Median, quartiles (inclusive method), min and max of at least two run times, in seconds."""
    if len(times) < 2:
        raise ValueError(f"a spread needs at least 2 timed runs, got {len(times)}")
    q1, _, q3 = statistics.quantiles(times, n=4, method="inclusive")
    return {"median_s": statistics.median(times), "q1_s": q1, "q3_s": q3,
            "min_s": min(times), "max_s": max(times)}


def time_runs(run: Callable[[], Any], repeats: int, warmup: int,
              sync: Callable[[], None] = lambda: None) -> list[float]:
    """Seconds of each of ``repeats`` calls of ``run()`` after ``warmup`` untimed ones.

    ``sync`` waits for the device (``torch.cuda.synchronize`` on CUDA) around each call.
    """
    times = []
    for i in range(warmup + repeats):
        sync()
        start = time.perf_counter()
        run()
        sync()
        if i >= warmup:
            times.append(time.perf_counter() - start)
    return times


# --- the neuron-level benchmark -------------------------------------------------------------

def candidates() -> dict[str, Callable[[Tensor], Tensor]]:
    """Layers to compare, all LIF tau=2, hard reset to 0, ATan(alpha=2): ``[T, B, ...] -> [T, B, ...]``."""
    layers: dict[str, Callable[[Tensor], Tensor]] = {
        f"spikegrad {b}": neuron.LIF(tau=2.0, surrogate=sg.ATan(), backend=b) for b in DEFAULT_BACKENDS}
    if importlib.util.find_spec("spikingjelly") is None:
        print("(SpikingJelly not measured: not installed)")
        return layers
    from spikingjelly.activation_based import functional as sjf

    sj = spikingjelly_lif()

    def sj_layer(x: Tensor) -> Tensor:
        sjf.reset_net(sj)  # SpikingJelly keeps membrane state on the module between calls
        return sj(x)

    layers["SpikingJelly LIFNode (m)"] = sj_layer
    return layers


def neuron_main(args: argparse.Namespace) -> None:
    """Print the neuron table: ``args.shape`` ``[T, B, ...]``, ``args.repeats`` timed runs each."""
    if args.repeats < 2:
        raise ValueError(f"--repeats must be at least 2 (the spread needs two runs), got {args.repeats}")
    x = torch.randn(*args.shape) * 0.8 + 0.5
    upstream = torch.randn_like(x)
    print(f"shape {args.shape}, torch {torch.__version__}, {_cpu_name()}, {torch.get_num_threads()} threads\n")
    print("| layer | median ms | IQR ms | ratio to reference |\n|---|---|---|---|")
    reference = None
    for name, layer in candidates().items():
        stats = summarize(time_runs(lambda: (layer(x.clone().requires_grad_()) * upstream).sum().backward(),
                                    args.repeats, warmup=3))
        reference = reference or stats["median_s"]
        print(f"| {name} | {stats['median_s'] * 1e3:.1f} | {(stats['q3_s'] - stats['q1_s']) * 1e3:.1f} "
              f"| {stats['median_s'] / reference:.2f} |")


# --- the convolution layout benchmark -------------------------------------------------------

LAYOUTS = {"contiguous": torch.contiguous_format, "channels-last": torch.channels_last}


def conv_main(args: argparse.Namespace) -> list[dict[str, Any]]:
    """Print the layout table: a 3x3 conv's forward+backward on 0/1 input ``[rows, C, H, W]`` for
    each ``C@H`` of ``args.maps``, contiguous and channels-last, timed in interleaved rounds;
    returns one dict per (map, layout) with the median and the ratio to contiguous."""
    if args.repeats < 2:
        raise ValueError(f"--repeats must be at least 2 (the spread needs two runs), got {args.repeats}")
    runs = {}
    for channels, side in args.maps:
        for layout, memory_format in LAYOUTS.items():
            conv = nn.Conv2d(channels, channels, 3, padding=1, bias=False).to(memory_format=memory_format)
            x = (torch.rand(args.rows, channels, side, side) < 0.2).float()
            x = x.contiguous(memory_format=memory_format).requires_grad_()
            grad = torch.randn_like(x)
            runs[(channels, side, layout)] = lambda conv=conv, x=x, grad=grad: conv(x).backward(grad)
    times: dict[tuple, list[float]] = {key: [] for key in runs}
    for run in runs.values():
        time_runs(run, 0, 2)
    for _ in range(args.repeats):
        for key, run in runs.items():
            times[key] += time_runs(run, 1, 0)
    print(f"3x3 conv forward+backward, {args.rows} rows of 0/1 input, torch {torch.__version__}, {_cpu_name()}, "
          f"{torch.get_num_threads()} threads; median of {args.repeats} interleaved rounds\n")
    print("| channels @ map | contiguous ms | channels-last ms | channels-last / contiguous |\n|---|---|---|---|")
    rows = []
    for channels, side in args.maps:
        plain, last = (statistics.median(times[(channels, side, layout)]) for layout in LAYOUTS)
        rows.append({"channels": channels, "side": side, "contiguous_s": plain, "channels_last_s": last,
                     "ratio": last / plain})
        print(f"| {channels} @ {side}x{side} | {plain * 1e3:.1f} | {last * 1e3:.1f} | {last / plain:.2f} |")
    return rows


# --- one training step ----------------------------------------------------------------------

@dataclass(frozen=True)
class Setup:
    """What every configuration of one benchmark run shares."""

    model: str
    width: float
    batch: int
    repeats: int
    warmup: int
    device: str
    threads: int
    compile: bool = False
    channels_last: bool = True


@dataclass(frozen=True)
class Case:
    """One configuration: ``net`` is ``ann``, ``spikegrad`` or a peer; ``backend`` the neuron backend
    (``-`` for the ANN, ``auto`` for SpikingJelly's own choice, ``torch`` for snnTorch);
    ``spike_conv`` spikegrad's ``create_model(spike_conv=...)`` (``-`` for the others)."""

    net: str
    backend: str
    T: int
    shortcut: bool
    spike_conv: str = "auto"

    @property
    def name(self) -> str:
        """The network's name in reports, e.g. ``spikegrad fused`` (``spike_conv`` auto) or
        ``spikegrad fused, dense convs`` (off)."""
        suffix = {"-": "", "auto": "", "off": ", dense convs", "on": ", spike convs"}[self.spike_conv]
        return {"ann": "ANN twin", "spikegrad": f"spikegrad {self.backend}{suffix}",
                "spikingjelly": "SpikingJelly", "snntorch": "snnTorch"}[self.net]

    @property
    def label(self) -> str:
        """The configuration in one line, e.g. ``spikegrad fused T=4 +shortcut``."""
        return f"{self.name} T={self.T}" + (" +shortcut" if self.shortcut else "")


def plan(model: str, ts: list[int], backends: list[str], peers: list[str],
         shortcuts: list[bool], compiled: bool = False, spike_convs: tuple[str, ...] = ("auto",)
         ) -> tuple[list[Case], list[dict[str, str]]]:
    """The cases to run (spikegrad once per backend and ``spike_convs`` mode), and
    ``{"case", "reason"}`` for the peers that cannot run here."""
    if compiled:
        missing = {p: "--compile compares the ANN twin and spikegrad, both compiled" for p in peers}
    else:
        missing = {p: "not installed" for p in peers if importlib.util.find_spec(p) is None}
    runnable = [p for p in peers if p not in missing]
    cases = []
    for shortcut in shortcuts:
        cases.append(Case("ann", "-", 1, shortcut, "-"))
        for T in ts:
            cases += [Case("spikegrad", b, T, shortcut, mode) for b in backends for mode in spike_convs]
            cases += [Case(p, "auto" if p == "spikingjelly" else "torch", T, shortcut, "-") for p in runnable]
    return cases, [{"case": p, "reason": reason} for p, reason in missing.items()]


def build_net(setup: Setup, case: Case) -> nn.Module:
    """The network of ``case``: ``create_model(setup.model, ...)`` (the ANN twin with ReLU neurons;
    it and spikegrad's channels-last unless ``setup.channels_last`` is False), or for a peer
    ``peers.peer_model`` (the same model with the peer's layers, contiguous); wrapped in
    ``ShortcutNet`` (branches at every stage but the last) when ``case.shortcut`` and in
    ``compile_model`` when ``setup.compile``; ``[B, 3, 32, 32]`` -> logits ``[T, B, 10]``
    (and branch logits)."""
    if case.net == "ann":
        net: nn.Module = create_model(setup.model, CLASSES, T=1, width=setup.width, neuron={"type": "relu"},
                                      channels_last=setup.channels_last)
    elif case.net == "spikegrad":
        net = create_model(setup.model, CLASSES, T=case.T, width=setup.width, backend=case.backend,
                           channels_last=setup.channels_last, spike_conv=case.spike_conv)
    else:
        net = peer_model(case.net, setup.model, CLASSES, T=case.T, width=setup.width)
    net = ShortcutNet(net) if case.shortcut else net  # type: ignore[arg-type]  # snnTorch's PerStep quacks like one
    return compile_model(net, dynamic=False) if setup.compile else net  # fixed shapes: no symbolic recompiles


def spike_density(setup: Setup, T: int) -> float:
    """The mean spike density of the inputs of spikegrad's convolutions of spikes at ``T``,
    weighted by their sizes, on the benchmark's batch at initialisation (what the spike-aware
    convolutions see: kernels.spike_conv)."""
    from spike_bench import spike_conv_shapes  # beside this file

    counts, density = spike_conv_shapes(setup.model, setup.width, T, setup.batch, IMAGE)
    sizes = {s: n * s.c_in * s.side ** 2 for s, n in counts.items()}
    return sum(density[s] * size for s, size in sizes.items()) / max(1, sum(sizes.values()))


def training_step(net: nn.Module, shortcut: bool, x: Tensor, y: Tensor) -> Callable[[], None]:
    """One SGD step of rate cross-entropy (combined with the branches' logits when ``shortcut``)."""
    optimizer = torch.optim.SGD(net.parameters(), lr=LR, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY)
    criterion = losses.RateCE().loss

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        out = net(x)
        loss = net.loss(*out, y, LAMBDA, criterion) if shortcut else criterion(out, y)
        loss.backward()
        optimizer.step()

    return step


def _peak_mib(device: torch.device) -> float:
    """CUDA: the most memory allocated since the last reset; CPU: this process's peak RSS so far."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return rss / (2**20 if sys.platform == "darwin" else 2**10)


class Prepared(NamedTuple):
    """A configuration ready to run: its training ``step``, the device ``sync`` and ``params``."""

    step: Callable[[], None]
    sync: Callable[[], None]
    params: int


def prepare(setup: Setup, case: Case) -> Prepared:
    """Build ``case``'s network (seed 0) and its training step on a fixed random batch."""
    device = torch.device(setup.device)
    if case.net in PEERS:
        importlib.import_module(case.net)  # its import is part of the base, not of the step
    torch.manual_seed(0)
    net = build_net(setup, case).to(device).train()
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(setup.batch, CHANNELS, IMAGE, IMAGE, generator=gen).to(device)
    y = torch.randint(0, CLASSES, (setup.batch,), generator=gen).to(device)
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
    return Prepared(training_step(net, case.shortcut, x, y), sync, sum(p.numel() for p in net.parameters()))


def _row(case: Case, params: int, times: list[float]) -> dict[str, Any]:
    return {**asdict(case), "name": case.name, "label": case.label, "params": params, "times_s": times,
            **summarize(times)}


def _with_threads(threads: int, fn: Callable[[], Any]) -> Any:
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        return fn()
    finally:
        torch.set_num_threads(before)


def measure(setup: Setup, case: Case) -> dict[str, Any]:
    """``case`` alone in this process: ``setup.repeats`` timed steps after ``setup.warmup``
    untimed ones; ``_row``'s fields plus ``peak_mib``/``base_mib``, the peak memory and the
    same before the model was built (this process's RSS on CPU: run it in a fresh process)."""
    def run() -> dict[str, Any]:
        device = torch.device(setup.device)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        if case.net in PEERS:
            importlib.import_module(case.net)
        base = _peak_mib(device)
        prepared = prepare(setup, case)
        times = time_runs(prepared.step, setup.repeats, setup.warmup, prepared.sync)
        return {**_row(case, prepared.params, times), "peak_mib": _peak_mib(device), "base_mib": base}
    return _with_threads(setup.threads, run)


Failure = dict[str, str]  # {"case": label, "reason": one line}


def time_interleaved(setup: Setup, groups: list[list[Case]], log: Callable[[str], None] = lambda line: None
                     ) -> tuple[list[dict[str, Any]], list[Failure]]:
    """Time the cases of each group in this process, in rounds: the group's cases are built
    and warmed up (``setup.warmup`` steps each), then each of ``setup.repeats`` rounds times
    one step of every case in turn, so drift in the machine's speed touches all of them
    alike. A group's networks are released before the next group is built (one group per T
    keeps the process small); a case in several groups (the ANN twin) is kept and its times
    are pooled.

    Returns ``_row``'s dict per case that ran, in order of first appearance, and
    ``{"case", "reason"}`` per case that failed (it never loses the others' numbers)."""
    order = list(dict.fromkeys(case for group in groups for case in group))
    last_group = {case: i for i, group in enumerate(groups) for case in group}

    def run() -> tuple[list[dict[str, Any]], list[Failure]]:
        ready: dict[Case, Prepared] = {}
        params: dict[Case, int] = {}
        times: dict[Case, list[float]] = {}
        failed: dict[Case, Failure] = {}
        for g, group in enumerate(groups):
            for case in group:
                if case in ready or case in failed:
                    continue
                try:
                    ready[case] = prepared = prepare(setup, case)
                    time_runs(prepared.step, 0, setup.warmup, prepared.sync)
                except Exception as err:
                    ready.pop(case, None)
                    failed[case] = {"case": case.label, "reason": f"{type(err).__name__}: {err}".splitlines()[0]}
                    log(f"{case.label}: failed: {failed[case]['reason']}")
                    continue
                params[case], times[case] = prepared.params, []
                log(f"{case.label}: built and warmed up")
            running = [case for case in group if case in ready]
            for r in range(1, setup.repeats + 1):
                for case in running:
                    times[case] += time_runs(ready[case].step, 1, 0, ready[case].sync)
                log(f"round {r}/{setup.repeats}: " + ", ".join(f"{c.label} {times[c][-1] * 1e3:.0f} ms"
                                                              for c in running))
            for case in running:
                if last_group[case] == g:
                    del ready[case]  # its network and optimizer state go before the next group
        return [_row(case, params[case], times[case]) for case in order if case in times], list(failed.values())
    return _with_threads(setup.threads, run)


def worker(spec: str) -> None:
    """Subprocess entry: ``spec`` is JSON ``{"setup": ..., "case": ...}``; prints ``measure``'s JSON."""
    parsed = json.loads(spec)
    print(json.dumps(measure(Setup(**parsed["setup"]), Case(**parsed["case"]))))


# glibc keeps freed buffers below its (growing) mmap threshold resident; with it fixed at
# 1 MiB every large tensor is its own mapping, unmapped when freed, so the peak RSS follows
# the memory actually in use (what CUDA's max_memory_allocated reports on a GPU)
LIVE_ENV = {"MALLOC_MMAP_THRESHOLD_": str(2**20)}


def run_isolated(setup: Setup, case: Case, env: dict[str, str] | None = None) -> dict[str, Any]:
    """``measure`` in a fresh Python process (so the peak RSS is this case's alone), with
    ``env`` added to its environment."""
    spec = json.dumps({"setup": asdict(setup), "case": asdict(case)})
    done = subprocess.run([sys.executable, "-c", _WORKER, spec], capture_output=True, text=True,
                          env={**os.environ, **(env or {})})
    if done.returncode != 0:
        lines = done.stderr.strip().splitlines() or [f"exit code {done.returncode}"]
        raise RuntimeError(lines[-1])
    return json.loads(done.stdout.strip().splitlines()[-1])


# --- ratios and the report ------------------------------------------------------------------

def _ratio(value: float | None, reference: float | None) -> float | None:
    return None if value is None or not reference else value / reference


def _paired(row: dict[str, Any], reference: dict[str, Any]) -> float | None:
    """``row``'s time / ``reference``'s: the median of the per-round ratios when both were
    timed in the same interleaved rounds (equal counts: the VM's drift cancels within a
    round), else the ratio of the medians (or None when the reference was not timed)."""
    times, ref_times = row["times_s"], reference.get("times_s") or []
    if len(times) != len(ref_times):
        return _ratio(row["median_s"], reference.get("median_s"))
    return statistics.median(t / ref for t, ref in zip(times, ref_times))


def memory_isolated(setup: Setup, case: Case) -> dict[str, Any]:
    """``case``'s memory, each figure from a fresh process running one warm-up and two steps:
    ``peak_mib``/``base_mib`` (peak, and before the model was built: RSS on CPU, CUDA's max
    allocated) and, on CPU, ``live_mib``/``live_base_mib``, the same with ``LIVE_ENV`` (memory
    in use, without the allocator's retention that the default allocator's peak includes)."""
    short = replace(setup, repeats=2, warmup=1)
    peak = run_isolated(short, case)
    memory = {"peak_mib": peak["peak_mib"], "base_mib": peak["base_mib"]}
    if setup.device == "cpu":
        live = run_isolated(short, case, LIVE_ENV)
        memory.update(live_mib=live["peak_mib"], live_base_mib=live["base_mib"])
    return memory


def measure_memory(setup: Setup, cases: list[Case], not_measured: list[Failure],
                   log: Callable[[str], None]) -> dict[str, dict[str, Any]]:
    """``memory_isolated`` of every case, by label; a case whose run fails is added to
    ``not_measured`` (its times still count). Run before this process builds any network:
    on Linux a child process starts with its parent's peak RSS as its own."""
    memory = {}
    for i, case in enumerate(cases, start=1):
        try:
            memory[case.label] = memory_isolated(setup, case)
        except Exception as err:
            not_measured.append({"case": f"{case.label} (memory)", "reason": str(err).splitlines()[0]})
            log(f"[{i}/{len(cases)}] {case.label}: memory not measured: {not_measured[-1]['reason']}")
            continue
        log(f"[{i}/{len(cases)}] {case.label}: peak {memory[case.label]['peak_mib']:.0f} MiB")
    return memory


def add_ratios(rows: list[dict[str, Any]]) -> None:
    """Set each row's ``ratios`` from the measured medians and peaks of the rows it compares to.

    ``per_T_ann``: median / (T x the ANN twin's median, same shortcut setting; the ANN twin's
    times are pooled over the T groups), every SNN row; ``vs_<peer>`` (time, ``_paired``),
    ``memory_vs_<peer>`` and ``live_memory_vs_<peer>``: spikegrad / the peer at the same T
    and shortcut setting; ``shortcut_over_plain`` (time, ``_paired``) and
    ``memory_shortcut_over_plain``: a shortcut row / the same configuration without
    branches; ``vs_dense_convs`` (time, ``_paired``): a spikegrad row / the same with
    ``spike_conv`` off. A ratio whose reference was not measured is None.
    """
    index = {(r["net"], r["backend"], r["T"], r["shortcut"], r["spike_conv"]): r for r in rows}
    by_net = {(r["net"], r["T"], r["shortcut"]): r for r in rows if r["spike_conv"] in ("-", "auto")}
    for r in rows:
        ratios: dict[str, float | None] = {}
        if r["net"] != "ann":
            ann = by_net.get(("ann", 1, r["shortcut"]))
            ratios["per_T_ann"] = _ratio(r["median_s"], ann and r["T"] * ann["median_s"])
        if r["net"] == "spikegrad":
            if r["spike_conv"] != "off":
                dense = index.get(("spikegrad", r["backend"], r["T"], r["shortcut"], "off")) or {}
                ratios["vs_dense_convs"] = _paired(r, dense)
            for peer in PEERS:
                ref = by_net.get((peer, r["T"], r["shortcut"])) or {}
                ratios[f"vs_{peer}"] = _paired(r, ref)
                ratios[f"memory_vs_{peer}"] = _ratio(r["peak_mib"], ref.get("peak_mib"))
                ratios[f"live_memory_vs_{peer}"] = _ratio(r.get("live_mib"), ref.get("live_mib"))
        if r["shortcut"]:
            plain = index.get((r["net"], r["backend"], r["T"], False, r["spike_conv"])) or {}
            ratios["shortcut_over_plain"] = _paired(r, plain)
            ratios["memory_shortcut_over_plain"] = _ratio(r["peak_mib"], plain.get("peak_mib"))
        r["ratios"] = ratios


def _fmt(value: float | None, digits: int = 2) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


COLUMNS = [("net", lambda r: r["name"]), ("T", lambda r: str(r["T"])),
           ("median ms", lambda r: _fmt(r["median_s"] * 1e3, 1)),
           ("IQR ms", lambda r: _fmt((r["q3_s"] - r["q1_s"]) * 1e3, 1)),
           ("peak MiB (before model)", lambda r: "–" if r["peak_mib"] is None
            else f"{r['peak_mib']:.0f} ({r['base_mib']:.0f})"),
           ("SNN / (T x ANN)", lambda r: _fmt(r["ratios"].get("per_T_ann"))),
           ("/ SpikingJelly", lambda r: _fmt(r["ratios"].get("vs_spikingjelly"))),
           ("/ snnTorch", lambda r: _fmt(r["ratios"].get("vs_snntorch"))),
           ("/ dense convs", lambda r: _fmt(r["ratios"].get("vs_dense_convs"))),
           ("mem / SpikingJelly", lambda r: _fmt(r["ratios"].get("memory_vs_spikingjelly"))),
           ("live MiB", lambda r: _fmt(r.get("live_mib"), 0)),
           ("live mem / SpikingJelly", lambda r: _fmt(r["ratios"].get("live_memory_vs_spikingjelly")))]
SHORTCUT_COLUMNS = [("shortcut / plain", lambda r: _fmt(r["ratios"].get("shortcut_over_plain"))),
                    ("mem shortcut / plain", lambda r: _fmt(r["ratios"].get("memory_shortcut_over_plain")))]


def _table(rows: list[dict[str, Any]], columns: list) -> list[str]:
    lines = ["| " + " | ".join(name for name, _ in columns) + " |", "|" + "---|" * len(columns)]
    return lines + ["| " + " | ".join(cell(r) for _, cell in columns) + " |" for r in rows]


def markdown(result: dict[str, Any]) -> str:
    """The report: the settings, one table per shortcut setting, and what was not measured."""
    meta = result["meta"]
    memory = {"cuda": "max allocated, one configuration per subprocess",
              "cpu": "peak RSS, one configuration per subprocess (live: another subprocess with "
                     "glibc's mmap threshold fixed at 1 MiB, so freed buffers leave RSS)"}[meta["device"]]
    layout = "channels-last" if meta["channels_last"] else "contiguous"
    lines = [f"## Training step: {meta['model']} (width {meta['width']:g}), batch {meta['batch']}, "
             f"{IMAGE}x{IMAGE} input, {CLASSES} classes",
             "",
             f"{meta['date']}; {meta['machine']}; torch threads: {meta['threads']}; load average "
             f"{meta['load_before']} before, {meta['load_after']} after; torch {meta['torch']}, "
             f"SpikingJelly {meta['spikingjelly']}, snnTorch {meta['snntorch']}; device {meta['device']}, "
             f"CPU kind {meta['cpu_kind']}.",
             "Spike density of spikegrad's convolution inputs (the benchmark batch, at initialisation): "
             + ", ".join(f"T={T} {d:.3f}" for T, d in meta["spike_density"].items()) + ".",
             f"Median and interquartile range of {meta['repeats']} steps after {meta['warmup']} warm-up "
             f"steps, timed in interleaved rounds in one process, one group per T (the ANN twin in every "
             f"group, its times pooled); time ratios to a peer and shortcut / plain: the median of the "
             f"per-round ratios; ANN twin and spikegrad {layout}; "
             f"memory: {memory if meta['isolated'] else 'not measured'}.",
             f"Command: `{meta['command']}`"]
    for shortcut in (False, True):
        rows = [r for r in result["rows"] if r["shortcut"] == shortcut]
        if rows:
            title = "With shortcut branches" if shortcut else "Without shortcut branches"
            lines += ["", f"### {title}", "", *_table(rows, COLUMNS + (SHORTCUT_COLUMNS if shortcut else []))]
    if result["not_measured"]:
        lines += ["", "Not measured: " + "; ".join(f"{s['case']} ({s['reason']})" for s in result["not_measured"])]
    return "\n".join(lines) + "\n"


def _cpu_name() -> str:
    """The CPU model from /proc/cpuinfo, else what ``platform`` knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def _load() -> str:
    return " ".join(f"{v:.2f}" for v in os.getloadavg())


def _command(args: argparse.Namespace, s: dict[str, Any]) -> str:
    """The ``spikegrad bench step`` command line that repeats this run (every option spelled out)."""
    words = ["spikegrad", "bench", "step", "--model", args.model, "--width", f"{s['width']:g}",
             "--batch", str(s["batch"]), "--T", *map(str, s["T"]), "--backends", *args.backends,
             "--peers", *args.peers, "--shortcut", args.shortcut, "--spike-conv", *args.spike_conv,
             "--repeats", str(s["repeats"]),
             "--warmup", str(s["warmup"]), "--device", s["device"], "--threads", str(s["threads"])]
    flags = [flag for flag, on in (("--compile", args.compile), ("--contiguous", args.contiguous),
                                   ("--in-process", args.in_process)) if on]
    return shlex.join(words + flags)


def _settings(args: argparse.Namespace) -> dict[str, Any]:
    """The options with ``--quick``'s or the full run's defaults filled in, validated."""
    defaults = QUICK_DEFAULTS if args.quick else STEP_DEFAULTS
    s = {key: default if getattr(args, key) is None else getattr(args, key) for key, default in defaults.items()}
    if args.model not in list_models():
        raise ValueError(f"unknown model {args.model!r}; expected one of {', '.join(list_models())}")
    if not s["width"] > 0 or min(s["batch"], s["threads"], *s["T"]) < 1 or s["warmup"] < 0:
        raise ValueError(f"--width, --batch and --threads must be positive, --T at least 1, --warmup at "
                         f"least 0; got {s}")
    if s["repeats"] < 2:
        raise ValueError(f"--repeats must be at least 2 (the spread needs two runs), got {s['repeats']}")
    device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: CUDA is not available to this torch build")
    return {**s, "device": device}


def step_main(args: argparse.Namespace) -> dict[str, Any]:
    """Run the training-step benchmark, print the report, write ``train_step.{md,json}`` to
    ``args.out`` (if given) and return the result (``meta``, ``rows``, ``not_measured``)."""
    s = _settings(args)
    setup = Setup(args.model, s["width"], s["batch"], s["repeats"], s["warmup"], s["device"], s["threads"],
                  args.compile, not args.contiguous)
    shortcuts = {"both": [False, True], "off": [False], "on": [True]}[args.shortcut]
    if args.backends is None:
        args.backends = [*DEFAULT_BACKENDS, *(["triton"] if s["device"] == "cuda" else [])]
    cases, not_measured = plan(args.model, sorted(set(s["T"])), args.backends, args.peers, shortcuts,
                               args.compile, tuple(args.spike_conv))
    meta = {**asdict(setup), "T": sorted(set(s["T"])), "isolated": not args.in_process,
            "date": datetime.datetime.now().isoformat(timespec="seconds"),
            "machine": f"{_cpu_name()}, {os.cpu_count()} CPUs",
            "torch": torch.__version__, "spikingjelly": _version("spikingjelly"), "snntorch": _version("snntorch"),
            "python": platform.python_version(), "load_before": _load(), "cpu_kind": cpu_kind(),
            "spike_density": {T: spike_density(setup, T) for T in sorted(set(s["T"]))},
            "command": _command(args, s)}
    log = lambda line: print(line, file=sys.stderr)  # noqa: E731
    memory = {} if args.in_process else measure_memory(setup, cases, not_measured, log)
    anns = [case for case in cases if case.net == "ann"]  # the reference of every T: timed with each
    groups = [anns + [case for case in cases if case.net != "ann" and case.T == T] for T in sorted(set(s["T"]))]
    rows, failed = time_interleaved(setup, groups, log)  # after: a child inherits its parent's peak RSS
    not_measured += failed
    for row in rows:
        row.update(memory.get(row["label"], {"peak_mib": None, "base_mib": None}))
    add_ratios(rows)
    result = {"meta": {**meta, "load_after": _load()}, "rows": rows, "not_measured": not_measured}
    text = markdown(result)
    print(text, end="")
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "train_step.md").write_text(text)
        (out / "train_step.json").write_text(json.dumps(result, indent=1) + "\n")
        print(f"wrote {out / 'train_step.md'} and {out / 'train_step.json'}", file=sys.stderr)
    return result


def main(args: argparse.Namespace) -> None:
    """``spikegrad bench``: ``args.kind`` ``"step"`` (training step), ``"neuron"`` (one LIF layer)
    or ``"conv"`` (a convolution in each memory layout) or ``"spikes"`` (convolutions of spikes,
    dense and on the spike path: spike_bench.py)."""
    import spike_bench  # beside this file

    {"neuron": neuron_main, "conv": conv_main, "spikes": spike_bench.main}.get(args.kind, step_main)(args)

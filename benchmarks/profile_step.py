"""Where a training step's time goes: ``torch.profiler`` self-CPU time by kind of work.

    .venv/bin/python benchmarks/profile_step.py [--net spikegrad] [--backend fused] [--T 4] [--threads 1]

Builds the network of ``spikegrad bench step`` with harness.py (CIFAR ResNet-18, batch 32;
``--net`` ``ann``, ``spikegrad``, ``spikingjelly`` or ``snntorch``), runs two warm-up steps,
profiles ``--profiles`` steps and prints the fastest one's totals per kind (seconds),
then its ten most expensive operators, and the fresh memory a step touches: minor page
faults (each a 4 KiB page the kernel maps and zeroes on first write) times what one
costs here, measured on a 33.5 MiB tensor. Recorded results: docs/performance.md.
"""
import argparse
import resource
import statistics

import torch
from torch.profiler import ProfilerActivity, profile

from harness import CHANNELS, CLASSES, IMAGE, Case, Setup, build_net, time_runs, training_step  # beside this file

KINDS = {
    "convolution forward": ("aten::mkldnn_convolution", "aten::_convolution"),
    "convolution backward": ("aten::convolution_backward",),
    "batch norm": ("aten::native_batch_norm", "aten::native_batch_norm_backward", "aten::addcmul"),
    "spike bits (pack, unpack)": ("aten::addmv_", "aten::index_select"),
    "copy_": ("aten::copy_",),
}


def page_fault_cost(numel: int = 128 * 64 * 32 * 32 + 1024, repeats: int = 15) -> float:
    """Seconds per minor page fault: filling a fresh ``[numel]`` float tensor (just above
    glibc's 32 MiB mmap threshold, so freshly mapped) minus refilling one already touched,
    per 4 KiB page (medians of ``repeats`` fills each)."""
    reused = torch.empty(numel)
    fresh, refill = (statistics.median(time_runs(fill, repeats, warmup=1))
                     for fill in (lambda: torch.empty(numel).fill_(1.0), lambda: reused.fill_(1.0)))
    return (fresh - refill) / (numel * 4 / 4096)


def minor_faults() -> int:
    """This process's minor page faults so far."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--net", default="spikegrad", choices=["ann", "spikegrad", "spikingjelly", "snntorch"])
    parser.add_argument("--backend", default="fused", help="spikegrad's neuron backend")
    parser.add_argument("--T", type=int, default=4)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--profiles", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    backend = {"ann": "-", "spikegrad": args.backend, "spikingjelly": "auto", "snntorch": "torch"}[args.net]
    case = Case(args.net, backend, 1 if args.net == "ann" else args.T, False)
    torch.manual_seed(0)
    net = build_net(Setup("resnet18", 1.0, args.batch, 1, 2, "cpu", args.threads), case).train()
    step = training_step(net, False, torch.randn(args.batch, CHANNELS, IMAGE, IMAGE),
                          torch.randint(0, CLASSES, (args.batch,)))
    for _ in range(2):  # warm-up: the fused neuron compiles in the first
        step()
    faults = minor_faults()
    step()
    faults = minor_faults() - faults
    runs = []
    for _ in range(args.profiles):
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            step()
        runs.append(prof.key_averages())
    events = min(runs, key=lambda evs: sum(e.self_cpu_time_total for e in evs))
    seconds = {e.key: e.self_cpu_time_total / 1e6 for e in events}
    print(f"{case.label}, batch {args.batch}, {args.threads} thread(s): step {sum(seconds.values()):.2f} s")
    for kind, names in KINDS.items():
        print(f"  {kind}: {sum(seconds.get(n, 0.0) for n in names):.2f} s")
    compiled = sum(s for key, s in seconds.items() if "CompiledFxGraph" in key)
    print(f"  compiled graphs (the fused neuron): {compiled:.2f} s")
    cost = page_fault_cost()
    print(f"  fresh pages: {faults} minor page faults in an unprofiled step ({faults * 4 / 1024:.0f} MiB)"
          f" x {cost * 1e6:.2f} us each = {faults * cost:.2f} s")
    print("  most expensive operators:")
    for key, s in sorted(seconds.items(), key=lambda kv: -kv[1])[:10]:
        print(f"    {key[:60]}: {s:.3f} s")


if __name__ == "__main__":
    main()

"""Which convolutions does oneDNN (inside torch) run without corrupting the heap?

Each configuration (kernel, stride, input/output channels, batch, map side, threads,
memory layout) runs in its own subprocess: 20 forward+backward passes with freshly
allocated inputs and heap churn in between, under ``MALLOC_CHECK_=3`` and
``MALLOC_PERTURB_`` (glibc aborts at the first inconsistency it sees, and freed memory
is filled, so a stale read shows up as a wrong gradient). The gradients of the last
pass are compared with a float64 contiguous reference, so corruption that does not
abort is caught too. A configuration is ``ok``, ``crash`` (signal/exit code), ``hang``
(no exit within 120 s: a corrupted allocator can deadlock) or ``wrong`` (gradients off).

    python benchmarks/onednn_sweep.py --isa AVX2 --out runs/onednn-sweep.jsonl
    python benchmarks/onednn_sweep.py --kernels 1 --strides 2 --cin 1 2 4 8 --cout 8 16

``--isa`` sets ``ONEDNN_MAX_CPU_ISA`` (oneDNN's own switch; AVX2 stands in for AMD
hosts on an AVX-512 machine); the summary lists the failing configurations.
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

CHILD = r"""
import sys, torch
from torch import nn
cin, cout, k, s, B, H, threads, last = map(int, sys.argv[1:9])
torch.set_num_threads(threads)
torch.manual_seed(0)
conv = nn.Conv2d(cin, cout, k, s, k // 2, bias=False)
fmt = torch.channels_last if last else torch.contiguous_format
for _ in range(20):
    x = torch.rand(B, cin, H, H).contiguous(memory_format=fmt).requires_grad_()
    conv.weight.grad = None
    y = conv(x)
    g = torch.randn_like(y)
    y.backward(g)
    junk = [torch.empty(997 * i) for i in range(1, 40)]
weight_grad = conv.weight.grad.double()
ref = nn.Conv2d(cin, cout, k, s, k // 2, bias=False).double()
ref.weight.data.copy_(conv.weight.data)
xd = x.detach().double().contiguous().requires_grad_()
ref(xd).backward(g.double())
ok = torch.allclose(x.grad.double(), xd.grad, rtol=1e-4, atol=1e-4) and \
     torch.allclose(weight_grad, ref.weight.grad, rtol=1e-3, atol=1e-3)
print("ok" if ok else "wrong")
"""


def run_one(cfg: dict, isa: str | None) -> dict:
    """Run one configuration in a fresh interpreter; ``cfg`` gains ``result`` and ``rc``."""
    env = dict(os.environ, MALLOC_CHECK_="3", MALLOC_PERTURB_="165", OMP_NUM_THREADS=str(cfg["threads"]))
    if isa:
        env["ONEDNN_MAX_CPU_ISA"] = isa
    args = [str(cfg[k]) for k in ("cin", "cout", "kernel", "stride", "batch", "side", "threads")]
    args.append(str(int(cfg["layout"] == "channels_last")))
    try:
        proc = subprocess.run([sys.executable, "-c", CHILD, *args], env=env, capture_output=True, text=True,
                              timeout=120)
    except subprocess.TimeoutExpired:  # a corrupted heap can deadlock the allocator
        return {**cfg, "result": "hang", "rc": -1}
    out = proc.stdout.strip().splitlines()
    result = out[-1] if proc.returncode == 0 and out else "crash"
    return {**cfg, "result": result, "rc": proc.returncode}


def configurations(args: argparse.Namespace) -> list[dict]:
    """Every combination of the swept values (channels-last only, unless ``--layouts``)."""
    keys = ("kernel", "stride", "cin", "cout", "batch", "side", "threads", "layout")
    values = (args.kernels, args.strides, args.cin, args.cout, args.batch, args.side, args.threads, args.layouts)
    return [dict(zip(keys, combo)) for combo in itertools.product(*values)]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--isa", default="AVX2", help="ONEDNN_MAX_CPU_ISA for the children ('' leaves it unset)")
    p.add_argument("--kernels", type=int, nargs="+", default=[1, 3])
    p.add_argument("--strides", type=int, nargs="+", default=[1, 2])
    p.add_argument("--cin", type=int, nargs="+", default=[1, 2, 3, 4, 6, 8, 12, 16, 32])
    p.add_argument("--cout", type=int, nargs="+", default=[2, 4, 8, 16, 32, 64])
    p.add_argument("--batch", type=int, nargs="+", default=[4])
    p.add_argument("--side", type=int, nargs="+", default=[16])
    p.add_argument("--threads", type=int, nargs="+", default=[1])
    p.add_argument("--layouts", nargs="+", default=["channels_last"], choices=["channels_last", "contiguous"])
    p.add_argument("--jobs", type=int, default=2, help="subprocesses at once")
    p.add_argument("--out", type=Path, default=None, help="JSON lines, one per configuration")
    args = p.parse_args()
    cfgs = configurations(args)
    bad = []
    with ThreadPoolExecutor(args.jobs) as pool:
        for row in pool.map(lambda c: run_one(c, args.isa or None), cfgs):
            if args.out:
                args.out.parent.mkdir(parents=True, exist_ok=True)
                with args.out.open("a") as f:
                    f.write(json.dumps(row) + "\n")
            if row["result"] != "ok":
                bad.append(row)
                print(f"{row['result']:5s} rc={row['rc']:4d} " + " ".join(f"{k}={row[k]}" for k in
                      ("kernel", "stride", "cin", "cout", "batch", "side", "threads", "layout")), flush=True)
    print(f"{len(cfgs)} configurations, {len(bad)} failed (isa {args.isa or 'native'})")


if __name__ == "__main__":
    main()

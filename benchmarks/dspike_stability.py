"""Is Dspike's temperature search stable? Repeat it on one fixed batch and model state.

The search (``schedules.DspikeTemperature``) keeps the candidate b among b - Δb, b,
b + Δb whose first-layer weight gradient best matches (cosine) a finite-difference
estimate along K random unit directions. This script trains a small net for a few
steps, then repeats the search ``--repeats`` times with different direction seeds on
the same batch and state, for each estimator setting, and prints how often each
candidate wins, the cosines, and how many finite differences were exactly zero (no
spike flipped: the step network's loss does not move).

    OMP_NUM_THREADS=1 python benchmarks/dspike_stability.py --repeats 8
"""
from __future__ import annotations

import argparse
import collections
import json
import statistics

import torch

from spikegrad import callbacks, losses, monitor
from spikegrad import surrogate as sg
from spikegrad.data import create_dataset, make_loader
from spikegrad.models import create_model
from spikegrad.schedules import DspikeTemperature


def trained_model(args: argparse.Namespace) -> tuple[torch.nn.Module, torch.Tensor, torch.Tensor]:
    """A model trained ``args.steps`` SGD steps on Fashion-MNIST, and one fixed batch."""
    torch.manual_seed(0)
    model = create_model(args.model, T=args.T, width=args.width, in_channels=1,
                         surrogate={"name": "dspike", "b": args.b}, backend="eager")
    data = create_dataset("fashion-mnist", split="train", limit=args.batch * (args.steps + 1))
    loader = make_loader(data, args.batch, shuffle=True, seed=0, epoch=0)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    objective = losses.RateCE()
    batches = iter(loader)
    fixed = next(batches)
    model.train()
    for _, (x, y) in zip(range(args.steps), batches):
        opt.zero_grad()
        objective.loss(model(x), y).backward()
        opt.step()
    return model, *fixed


def search_once(model, x, y, setting: dict, seed: int, b: float) -> dict:
    """One search from ``b``; the cosines of every candidate and the zero differences."""
    dspikes = callbacks.surrogates_of(model, sg.Dspike)
    for s in dspikes:
        s.b = b
    weight = dict(model.named_modules())[monitor.layer_names(model)[0]].weight
    search = DspikeTemperature(b, setting["delta"], setting["eps"], setting["directions"], seed,
                               relative_eps=setting["relative"], train_mode=setting["train_mode"])
    chosen = search.step(model, weight, dspikes, lambda: losses.RateCE().loss(model(x), y), epoch=1)
    return {"chosen": chosen, "cosines": search.last_cosines, "zero_differences": search.last_zero}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="resnet18")
    p.add_argument("--width", type=float, default=0.25)
    p.add_argument("--T", type=int, default=4)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--b", type=float, default=3.0)
    p.add_argument("--repeats", type=int, default=8)
    p.add_argument("--only", default="", help="run only the settings whose name contains this")
    p.add_argument("--out", default=None, help="JSON file of every search")
    args = p.parse_args()
    model, x, y = trained_model(args)
    settings = {
        "eval BN, eps 1e-3, K 32": dict(delta=0.2, eps=1e-3, directions=32, relative=False,
                                                    train_mode=False),
        "train BN, eps 1e-3, K 32": dict(delta=0.2, eps=1e-3, directions=32, relative=False, train_mode=True),
        "train BN, eps 0.05 x |W|, K 32": dict(delta=0.2, eps=0.05, directions=32, relative=True,
                                               train_mode=True),
        "train BN, eps 0.05 x |W|, K 64": dict(delta=0.2, eps=0.05, directions=64, relative=True,
                                                train_mode=True),
    }
    results = {}
    for name, setting in settings.items():
        if args.only not in name:
            continue
        runs = [search_once(model, x, y, setting, seed, args.b) for seed in range(args.repeats)]
        wins = collections.Counter(round(r["chosen"], 3) for r in runs)
        zeros = statistics.mean(r["zero_differences"] for r in runs)
        print(f"{name}: chosen {dict(sorted(wins.items()))}; zero differences {zeros:.1f} of "
              f"{setting['directions']}; cosines (b-Δ, b, b+Δ) first run "
              f"{[round(c, 3) for c in runs[0]['cosines']]}", flush=True)
        results[name] = runs
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"args": vars(args), "results": results}, f, indent=1)


if __name__ == "__main__":
    main()

"""Per-layer firing rates of spiking networks: trained on Fashion-MNIST, and the benchmark net at init.

What fraction of a neuron layer's outputs are 1 sets the density of the spike tensor the next
convolution reads, so a conv whose forward and weight-gradient cost scale with that density
would run at (roughly) the mean rate weighted by each layer's size. This script:

1. reads the default run (configs/default.yaml: plain-8, width 0.25, T=2) from
   ``runs/fmnist-evolutionary`` when its config matches, else trains it on 20,000 images;
2. trains ResNet-18 and VGG-11 (T=4, the default config's LIF neuron, surrogate and Adam,
   method vanilla) on a short budget into ``runs/firing-rates/`` (a finished run is reused);
3. reads each run's ``firing_rate/<layer>`` (the trainer's evaluation on the test images)
   after the first and the last epoch from ``metrics.jsonl``;
4. measures the benchmark network of ``spikegrad bench step`` (ResNet-18, width 1.0, T=4,
   batch 32 of randn 3x32x32) at initialisation, one forward in train and in eval mode, with
   the bench's own neuron (threshold 1) and the default config's (threshold 0.5);
5. writes ``docs/results/firing-rates.md``.

Run from the repository root, on one thread at low priority (about 40 min on 2 AMD EPYC cores):

    OMP_NUM_THREADS=1 nice -n 19 .venv/bin/python benchmarks/firing_rates.py

Neurons run the uncompiled kernels (``neuron.backend=eager``): no background compile process.
"""
from __future__ import annotations

import argparse
import datetime
import json
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from spikegrad import monitor
from spikegrad.config import Config, load_config, to_dict
from spikegrad.data import create_dataset
from spikegrad.models import create_model
from spikegrad.train import RESUME_ALLOWED, Trainer, build_model, config_changes, dataset_info

DEFAULT_CONFIG = "configs/default.yaml"
DEFAULT_RUN = Path("runs/fmnist-evolutionary")
OUT = "runs/firing-rates"


def neuron_sizes(model: nn.Module, x: Tensor) -> dict[str, int]:
    """Neurons (elements per sample and time step) of each neuron layer, in forward order."""
    with monitor.FiringRates(model) as fr, torch.no_grad():
        model(x)
    return fr.neurons()


def weighted(rates: dict[str, float], sizes: dict[str, int]) -> float:
    """Mean rate over layers weighted by their number of neurons (total spikes / total outputs)."""
    return sum(rates[k] * sizes[k] for k in sizes) / sum(sizes.values())


def train(cfg: Config) -> float | None:
    """Train ``cfg``'s run unless it finished before; its wall time in seconds (None: reused)."""
    if len(epoch_records(Path(cfg.out) / cfg.name)) == cfg.epochs:
        return None
    start = time.perf_counter()
    Trainer(cfg, overwrite=True).fit()
    return time.perf_counter() - start


def epoch_records(run: Path) -> list[dict[str, Any]]:
    """The run's ``kind: epoch`` records (the last one of each epoch), in order."""
    if not (run / "metrics.jsonl").is_file():
        return []
    records = {}
    for line in (run / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        if record["kind"] == "epoch":
            records[record["epoch"]] = record
    return [records[k] for k in sorted(records)]


def run_result(label: str, cfg: Config, wall: float | None, command: str) -> dict[str, Any]:
    """Rates after the first and last epoch, layer sizes, accuracy and times of a finished run."""
    run = Path(cfg.out) / cfg.name
    epochs = epoch_records(run)
    rates = [{k.split("/", 1)[1]: v for k, v in e.items() if k.startswith("firing_rate/")} for e in epochs]
    test = create_dataset(cfg.data.name, cfg.data.root, "test", T=cfg.model.T, limit=1)
    x = test.item(0, augment=False)[0].unsqueeze(0)
    sizes = neuron_sizes(build_model(cfg, dataset_info(test)).eval(), x)
    if set(sizes) != set(rates[-1]):
        raise RuntimeError(f"{run}: neuron layers {sorted(sizes)} differ from the logged {sorted(rates[-1])}")
    return {"label": label, "run": str(run), "command": command, "sizes": sizes,
            "columns": {"after epoch 1": rates[0], f"after epoch {len(epochs)}": rates[-1]},
            "acc": [e["test_acc"] for e in epochs], "train_s": sum(e["epoch_time"] for e in epochs),
            "wall_s": wall, "images": cfg.data.limit_train, "test_images": cfg.data.limit_test}


def bench_rates(threshold: float, seed: int) -> dict[str, Any]:
    """``spikegrad bench step``'s ResNet-18 (width 1, T=4) at init on randn [32, 3, 32, 32]:
    firing rates of one forward in train mode (batch statistics) and one in eval mode."""
    torch.manual_seed(seed)
    net = create_model("resnet18", 10, T=4, in_channels=3, width=1.0, backend="eager",
                       neuron={"type": "lif", "tau": 2.0, "v_threshold": threshold, "v_reset": 0.0})
    x = torch.randn(32, 3, 32, 32)
    columns = {}
    for mode in ("train", "eval"):
        net.train(mode == "train")
        with monitor.FiringRates(net) as fr, torch.no_grad():
            net(x)
        columns[f"{mode} mode"] = fr.rates()
    return {"label": f"bench ResNet-18, width 1, T=4, at init, LIF v_threshold {threshold:g}",
            "sizes": fr.neurons(), "columns": columns}


def section(r: dict[str, Any]) -> list[str]:
    """One network's table: a row per neuron layer, then the weighted and plain means."""
    names = list(r["columns"])
    lines = [f"### {r['label']}", ""]
    if "run" in r:
        acc = " -> ".join(f"{a:.2f}%" for a in r["acc"])
        wall = "reused, not re-timed" if r["wall_s"] is None else f"{r['wall_s'] / 60:.1f} min wall"
        lines += [f"Run `{r['run']}`: {r['images'] or 'all'} training images, {r['test_images'] or 'all'} "
                  f"test images; test accuracy per epoch {acc}; training {r['train_s'] / 60:.1f} min "
                  f"(sum of epoch_time), {wall}.", f"`{r['command']}`", ""]
    lines += ["| neuron layer | neurons | " + " | ".join(names) + " |", "|---|---|" + "---|" * len(names)]
    for layer, size in r["sizes"].items():
        lines.append(f"| {layer} | {size} | " + " | ".join(f"{r['columns'][c][layer]:.3f}" for c in names) + " |")
    for what, mean in (("weighted by neurons", lambda c: weighted(c, r["sizes"])),
                       ("plain", lambda c: sum(c.values()) / len(c))):
        lines.append(f"| **mean, {what}** | {sum(r['sizes'].values())} | "
                     + " | ".join(f"**{mean(r['columns'][c]):.3f}**" for c in names) + " |")
    return lines + [""]


def default_run() -> tuple[Config, float | None, str]:
    """The default run's config: the recorded run when it matches configs/default.yaml
    (keys that change no result aside), else a run on 20,000 images trained now."""
    cfg = load_config(DEFAULT_CONFIG)
    ignore = set(RESUME_ALLOWED) - {"epochs"}
    saved = load_config(DEFAULT_RUN / "config.yaml") if (DEFAULT_RUN / "config.yaml").is_file() else None
    if saved and len(epoch_records(DEFAULT_RUN)) == saved.epochs and \
            not set(config_changes(to_dict(saved), cfg)) - ignore:
        return saved, None, f"spikegrad train --config {DEFAULT_CONFIG}"
    sets = ["name=firing-default", f"out={OUT}", "data.limit_train=20000", "neuron.backend=eager"]
    cfg = load_config(DEFAULT_CONFIG, sets)
    return cfg, train(cfg), command(DEFAULT_CONFIG, sets)


def command(config: str, sets: list[str]) -> str:
    return shlex.join(["spikegrad", "train", "--config", config, *[w for s in sets for w in ("--set", s)]])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--limit-train", type=int, default=5000, help="training images (class-balanced)")
    parser.add_argument("--limit-test", type=int, default=1000, help="test images the rates are measured on")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--resnet-width", type=float, default=0.5, help="1.0 takes ~33 min/epoch on 1 thread")
    parser.add_argument("--vgg-width", type=float, default=1.0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default="docs/results/firing-rates.md")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    cfg, wall, cmd = default_run()
    results = [run_result("plain-8, width 0.25, T=2 (configs/default.yaml, method evolutionary)", cfg, wall, cmd)]
    for model, width in (("resnet18", args.resnet_width), ("vgg11", args.vgg_width)):
        sets = [f"name=firing-{model}-w{width:g}", f"out={OUT}", f"model.name={model}", f"model.width={width}",
                "model.T=4", "method.name=vanilla", "neuron.backend=eager", f"epochs={args.epochs}",
                f"data.limit_train={args.limit_train}", f"data.limit_test={args.limit_test}"]
        cfg = load_config(DEFAULT_CONFIG, sets)
        wall = train(cfg)
        results.append(run_result(f"{model}, width {width:g}, T=4 (vanilla)", cfg, wall, command(DEFAULT_CONFIG, sets)))
    results += [bench_rates(threshold, seed=0) for threshold in (1.0, 0.5)]
    total = time.perf_counter() - start
    cpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    machine = next((l.split(":", 1)[1].strip() for l in cpu.splitlines() if l.startswith("Model name")), "?")
    lines = ["# Firing rates per neuron layer", "",
             f"{datetime.date.today()}; {machine}, {torch.get_num_threads()} torch thread(s), torch "
             f"{torch.__version__}; total wall time {total / 60:.1f} min.",
             f"Command: `OMP_NUM_THREADS={args.threads} nice -n 19 python {shlex.join(sys.argv)}`", "",
             "Firing rate: fraction of a layer's outputs [T, B, ...] that are 1. Trained runs: the trainer's "
             "evaluation (eval mode, the run's test images). Neurons: outputs per sample and time step. "
             "The mean weighted by neurons (total spikes / total outputs) is the density the convolutions "
             "reading these spike tensors see on average.", "",
             "| network | weighted mean rate | test accuracy |", "|---|---|---|"]
    for r in results:
        rates = " / ".join(f"{weighted(c, r['sizes']):.3f} ({name})" for name, c in r["columns"].items())
        acc = f"{r['acc'][-1]:.2f}%" if "acc" in r else "– (random input)"
        lines.append(f"| {r['label']} | {rates} | {acc} |")
    lines.append("")
    for r in results:
        lines += section(r)
    Path(args.out).write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()

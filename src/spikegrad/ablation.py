"""Ablation: one base config trained with several methods over several seeds, summarised.

    table = run_ablation("configs/shortcut/cifar10-resnet18-t4-vanilla.yaml",
                         ["vanilla", "shortcut", "evolutionary"], seeds=3, overrides=["epochs=50"])

Every run goes through ``Trainer`` into ``<out>/<name>-<method>-s<seed>/`` (docs/architecture.md,
"The run directory"), where ``<name>`` is the base config's name without a trailing ``-<its method>``
(``cifar10-resnet18-t4-vanilla`` -> ``cifar10-resnet18-t4``) and ``<out>`` is ``out`` or
the config's ``out``. Re-running is safe: a run whose directory holds ``report.md`` is
finished and skipped, one with ``checkpoints/last.pt`` is resumed, any other starts
afresh; a run directory made with a different config is refused before anything trains.
Then ``<out>/<name>-ablation.md`` gets a table, one row per method, of mean ± sample
std over seeds, and ``<out>/<name>-ablation.png`` the accuracy curves and per-layer
gradient norms of each method's first seed (``plots.plot_compare``).

``--sweep KEY=V1,V2,...`` repeats the whole ablation for each value of one key (depth
``model.name=plain-8,plain-16,plain-32``, ``model.T=1,2,4``, a surrogate width...), the
value's ablation named ``<name>-<value>``, then writes ``<out>/<name>-sweep.md`` (final
accuracy per method and value, its gap to vanilla, the first / last gradient-norm ratio)
and ``<out>/<name>-sweep.png`` (``plots.plot_sweep``).
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .config import Config, ConfigError, load_config, to_dict

__all__ = ["AblationRun", "ablation_name", "plan", "check_run_dir", "train", "summarise",
           "format_table", "run_ablation", "run_sweep", "add_arguments", "main"]

# keys that may differ between a run directory's config and the ablation's: where and how a
# run executes, and what the config says about the paper, not what the run computes
INFRASTRUCTURE = ("device", "data.root", "data.num_workers", "log_every", "checkpoint_every", "progress_every",
                  "expected_accuracy", "expected_source")
GRAD = "grad_norm/"
# table columns: (summary key, header, decimals)
COLUMNS = (("best_acc", "best test acc (%)", 2), ("final_acc", "final test acc (%)", 2),
           ("first_grad", "first-layer grad norm", 4), ("grad_ratio", "first / last grad norm", 3),
           ("epoch_time", "train time / epoch (s)", 1))


@dataclass(frozen=True)
class AblationRun:
    """One (method, seed) cell and its resolved config (whose ``name`` is the run's)."""

    method: str
    seed: int
    cfg: Config

    @property
    def run_dir(self) -> Path:
        """``<out>/<name>-<method>-s<seed>``."""
        return Path(self.cfg.out) / self.cfg.name


def ablation_name(cfg: Config) -> str:
    """The base config's name without a trailing ``-<method.name>``."""
    return cfg.name.removesuffix(f"-{cfg.method.name}") or cfg.name


def _seed_list(seeds: int | list[int]) -> list[int]:
    """``n`` -> ``[0, ..., n-1]``; a list as given. Raises ``ValueError`` for none."""
    chosen = list(range(seeds)) if isinstance(seeds, int) else list(seeds)
    if not chosen:
        raise ValueError(f"an ablation needs at least one seed, got {seeds!r}")
    return chosen


def plan(base_config: str | Path, methods: list[str], seeds: int | list[int], overrides: list[str],
         out: str | None = None) -> tuple[str, Path, list[AblationRun]]:
    """``(name, out directory, runs)``: every cell's config resolved (and validated) up front,
    method-major. ``overrides`` apply to every run, before the method, seed and name."""
    methods = list(dict.fromkeys(methods))
    if not methods:
        raise ValueError("an ablation needs at least one method")
    base = load_config(base_config, overrides)
    name, folder = ablation_name(base), out if out is not None else base.out
    runs = [AblationRun(method, seed, load_config(base_config, [
        *overrides, f"method.name={method}", f"seed={seed}", f"name={name}-{method}-s{seed}",
        f"out={folder}"])) for method in methods for seed in _seed_list(seeds)]
    return name, Path(folder), runs


def _flat(data: dict, prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}``."""
    flat: dict[str, Any] = {}
    for key, value in data.items():
        if isinstance(value, dict):
            flat.update(_flat(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def check_run_dir(run: AblationRun) -> None:
    """Raise ``ConfigError`` if the run's directory was made with a config that differs from
    ``run.cfg`` in any key but ``INFRASTRUCTURE`` (keys it lacks count at their defaults); a
    directory without config.yaml passes."""
    path = run.run_dir / "config.yaml"
    if not path.is_file():
        return
    # through load_config, so that a key added to the library since (at its default) is no difference
    stored, wanted = _flat(to_dict(load_config(path))), _flat(to_dict(run.cfg))
    for key in sorted(stored.keys() | wanted.keys()):
        if key not in INFRASTRUCTURE and stored.get(key) != wanted.get(key):
            raise ConfigError(f"run directory {str(run.run_dir)!r} was made with {key}="
                              f"{stored.get(key)!r}, this ablation asks for {wanted.get(key)!r}; "
                              "delete that run or choose another --out")


def _status(run: AblationRun) -> str:
    """``finished`` (report.md), ``resume`` (checkpoints/last.pt) or ``start``."""
    if (run.run_dir / "report.md").is_file():
        return "finished"
    return "resume" if (run.run_dir / "checkpoints" / "last.pt").is_file() else "start"


def train(run: AblationRun) -> None:
    """Train, resume or skip ``run`` according to ``_status``."""
    from .train import Trainer  # torch: imported when training, not when the CLI is built

    status = _status(run)
    print(f"ablation: {run.cfg.name}: {'finished, skipped' if status == 'finished' else status}",
          file=sys.stderr, flush=True)
    if status != "finished":
        Trainer(run.cfg, resume=status == "resume", overwrite=status == "start").fit()


def summarise(run_dir: str | Path) -> dict[str, float]:
    """A finished run's ``best_acc``, ``final_acc`` (test, %), ``first_grad`` (the first layer's
    gradient norm), ``grad_ratio`` (first / last layer's) and ``epoch_time`` (s), the last
    three averaged over epochs, from its ``metrics.jsonl`` epoch records."""
    from .plots import read_metrics

    records = read_metrics(Path(run_dir) / "metrics.jsonl")
    epochs = list({r["epoch"]: r for r in records if r.get("kind") == "epoch"}.values())
    if not epochs:
        raise ValueError(f"{run_dir}: no epoch records in metrics.jsonl")
    norms = [[v for k, v in r.items() if k.startswith(GRAD)] for r in epochs]  # shallow to deep
    first = [n[0] for n in norms if n]
    ratios = [n[0] / n[-1] for n in norms if n and n[-1] > 0]
    nan = float("nan")
    return {"best_acc": max(r["test_acc"] for r in epochs), "final_acc": epochs[-1]["test_acc"],
            "first_grad": statistics.fmean(first) if first else nan,
            "grad_ratio": statistics.fmean(ratios) if ratios else nan,
            "epoch_time": statistics.fmean(r["epoch_time"] for r in epochs)}


def _mean_std(values: list[float], decimals: int) -> str:
    """``mean ± sample std`` (the mean alone for one value)."""
    mean = statistics.fmean(values)
    if len(values) < 2:
        return f"{mean:.{decimals}f}"
    return f"{mean:.{decimals}f} ± {statistics.stdev(values):.{decimals}f}"


def format_table(summaries: dict[str, list[dict[str, float]]]) -> str:
    """A markdown table: one row per method (``{method: [summary per seed]}``), one column
    per ``COLUMNS`` entry, each cell mean ± std over the seeds."""
    header = ["method", "seeds", *[title for _, title, _ in COLUMNS]]
    rows = [[method, str(len(runs)), *[_mean_std([r[key] for r in runs], decimals)
                                       for key, _, decimals in COLUMNS]]
            for method, runs in summaries.items()]
    return _markdown_table(header, rows)


def _markdown_table(header: list[str], rows: list[list[str]]) -> str:
    lines = [header, ["---"] * len(header), *rows]
    return "\n".join("| " + " | ".join(line) + " |" for line in lines)


def _listed(overrides: list[str]) -> str:
    """``--set`` items as inline code, or ``none``."""
    return " ".join(f"`{item}`" for item in overrides) or "none"


def _report(name: str, base_config: str | Path, overrides: list[str], runs: list[AblationRun],
            table: str, figure: Path) -> str:
    """The ablation's markdown page."""
    cfg = runs[0].cfg
    return "\n".join([
        f"# Ablation {name}", "",
        f"Base config `{base_config}`, overrides {_listed(overrides)}: {cfg.model.name}, T={cfg.model.T}, "
        f"{cfg.data.name}, {cfg.epochs} epochs, seeds {sorted({r.seed for r in runs})}.", "",
        table, "",
        "Test accuracy is the exported model's (main head only). Gradient norms are the "
        "per-step weight-gradient norms logged each epoch, averaged over epochs; a first / last "
        "ratio far below 1 means the shallow layers get little gradient. Time counts training "
        "steps only (no data loading, no evaluation). ± is the sample standard deviation over "
        "seeds.", "",
        f"![accuracy and gradient norms]({figure.name}) (each method's first seed)", "",
        "Runs: " + ", ".join(f"`{r.run_dir}`" for r in runs), ""])


def run_ablation(base_config: str | Path, methods: list[str], seeds: int | list[int],
                 overrides: list[str] | None = None, out: str | None = None) -> Path:
    """Train every method on every seed (see the module docstring), then write
    ``<out>/<name>-ablation.md`` and ``.png``; returns the markdown file's path. Under
    ``torchrun`` every rank trains and rank 0 alone writes the summary."""
    from .plots import plot_compare

    overrides = list(overrides or [])
    name, folder, runs = plan(base_config, methods, seeds, overrides, out)
    for run in runs:
        check_run_dir(run)
    for run in runs:
        train(run)
    page = folder / f"{name}-ablation.md"
    if os.environ.get("RANK", "0") != "0":
        return page
    summaries = _summaries(runs)
    first_seed: dict[str, Path] = {}
    for run in runs:
        first_seed.setdefault(run.method, run.run_dir)
    figure = plot_compare(first_seed, folder / f"{name}-ablation.png")
    page.write_text(_report(name, base_config, overrides, runs, format_table(summaries), figure))
    return page


def _summaries(runs: list[AblationRun]) -> dict[str, list[dict[str, float]]]:
    """``{method: [summarise(run) per seed]}``, methods in plan order."""
    summaries: dict[str, list[dict[str, float]]] = {}
    for run in runs:
        summaries.setdefault(run.method, []).append(summarise(run.run_dir))
    return summaries


def run_sweep(base_config: str | Path, methods: list[str], seeds: int | list[int], key: str,
              values: list[str], overrides: list[str] | None = None, out: str | None = None) -> Path:
    """``run_ablation`` once per value of ``key`` (see the module docstring), then the sweep's
    page and figure; returns the page's path."""
    from .plots import plot_sweep

    overrides = list(overrides or [])
    stem, folder, _ = plan(base_config, methods, seeds, overrides, out)
    cells: dict[str, dict[str, dict[str, list[float]]]] = {m: {} for m in dict.fromkeys(methods)}
    for value in values:
        per_value = [*overrides, f"{key}={value}", f"name={stem}-{value}"]
        run_ablation(base_config, methods, seeds, per_value, out)
        for method, runs in _summaries(plan(base_config, methods, seeds, per_value, out)[2]).items():
            cells[method][value] = {k: [r[k] for r in runs] for k in ("final_acc", "grad_ratio")}
    page = folder / f"{stem}-sweep.md"
    if os.environ.get("RANK", "0") != "0":
        return page
    figure = plot_sweep(key, values, cells, folder / f"{stem}-sweep.png")
    page.write_text(_sweep_report(stem, base_config, overrides, key, values, cells, figure))
    return page


def _sweep_report(stem: str, base_config: str | Path, overrides: list[str], key: str, values: list[str],
                  cells: dict[str, dict[str, dict[str, list[float]]]], figure: Path) -> str:
    """The sweep's markdown page: one row per value, final accuracy and gap to vanilla per method."""
    vanilla = cells.get("vanilla")
    header = [key] + [f"{m} final acc (%)" for m in cells] + [
        f"{m} - vanilla" for m in cells if vanilla is not None and m != "vanilla"] + [
        f"{m} first/last grad" for m in cells]
    rows = []
    for value in values:
        base = statistics.fmean(vanilla[value]["final_acc"]) if vanilla is not None else 0.0
        row = [value] + [_mean_std(c[value]["final_acc"], 2) for c in cells.values()]
        row += [f"{statistics.fmean(c[value]['final_acc']) - base:+.2f}" for m, c in cells.items()
                if vanilla is not None and m != "vanilla"]
        row += [_mean_std(c[value]["grad_ratio"], 4) for c in cells.values()]
        rows.append(row)
    return "\n".join([
        f"# Sweep {stem} over {key}", "",
        f"Base config `{base_config}`, overrides {_listed(overrides)}; one ablation per value "
        f"(pages `{stem}-<value>-ablation.md`).", "",
        _markdown_table(header, rows), "",
        "Final test accuracy of the exported model, mean ± sample std over seeds; the gap is "
        "the difference of seed means; gradient ratios as in each ablation's page.", "",
        f"![sweep]({figure.name})", ""])


def _methods(text: str) -> list[str]:
    """``"vanilla, shortcut"`` -> ``["vanilla", "shortcut"]``."""
    return [m.strip() for m in text.split(",") if m.strip()]


def _seeds(text: str) -> int | list[int]:
    """``"3"`` -> 3 (seeds 0, 1, 2); ``"0,5"`` or ``"7,"`` -> those seeds."""
    try:
        return [int(s) for s in text.split(",") if s.strip()] if "," in text else int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--seeds takes a count (3) or a list (0,5,7), "
                                         f"got {text!r}") from None


def _sweep(text: str) -> tuple[str, list[str]]:
    """``"model.T=1,2,4"`` -> ``("model.T", ["1", "2", "4"])``."""
    key, sep, values = text.partition("=")
    chosen = [v.strip() for v in values.split(",") if v.strip()]
    if not sep or not key.strip() or not chosen:
        raise argparse.ArgumentTypeError(f"--sweep takes KEY=V1,V2,... (e.g. model.name=plain-8,plain-16), "
                                         f"got {text!r}")
    return key.strip(), chosen


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``spikegrad ablation`` options."""
    parser.add_argument("--config", required=True, help="base YAML config (its method is replaced)")
    parser.add_argument("--methods", type=_methods, default=["vanilla", "shortcut", "evolutionary"],
                        help="comma-separated method names (default: vanilla,shortcut,evolutionary)")
    parser.add_argument("--seeds", type=_seeds, default=3,
                        help="number of seeds (3 means 0,1,2) or a comma-separated list (default: 3)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config key in every run, e.g. --set epochs=50 (repeatable)")
    parser.add_argument("--out", help="folder of the runs and the summary (default: the config's out)")
    parser.add_argument("--sweep", type=_sweep, metavar="KEY=V1,V2,...",
                        help="repeat the ablation for each value of one key, e.g. model.name=plain-8,plain-16, "
                             "and draw accuracy and the gap to vanilla against it")


def main(args: argparse.Namespace) -> None:
    """Run ``spikegrad ablation`` (or its sweep) and print the page's path and contents."""
    if args.sweep is not None:
        page = run_sweep(args.config, args.methods, args.seeds, *args.sweep, args.set, args.out)
    else:
        page = run_ablation(args.config, args.methods, args.seeds, args.set, args.out)
    print(page.read_text())
    print(f"wrote {page} and {page.with_suffix('.png')}")

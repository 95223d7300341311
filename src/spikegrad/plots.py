"""Figures of a run, drawn from its ``metrics.jsonl`` (docs/architecture.md, "The run directory").

``plot_run(run_dir)`` writes ``run_dir/plots/``: ``curves.png`` (accuracy, loss, and the
balance coefficient lambda when logged, per step where step records hold it),
``grad_norms.png`` (per-layer gradient norm, shallow to deep, one line per epoch, and its
ratio to the last layer's: the gradient-vanishing diagnosis), ``firing_rates.png`` and
``steps.png`` (the per-step records: loss, learning rate, lambda). ``plot_compare`` puts
several runs side by side (vanilla, shortcut, evolutionary), labelled by name and method;
``plot_sweep`` draws an ablation repeated over the values of one key. Accuracy axes are in
percent, epoch axes take integer ticks, and test and train differ in colour (one run) or
marker (several runs), not only in line style. Figures are drawn on
``matplotlib.figure.Figure`` with the Agg renderer: no pyplot, no global backend switch,
safe in a training process.
"""
from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import yaml
from matplotlib import colormaps
from matplotlib.axes import Axes
from matplotlib.cm import ScalarMappable
from matplotlib.colors import Normalize
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator, PercentFormatter

__all__ = ["read_metrics", "plot_run", "plot_compare", "plot_sweep"]

GRAD = "grad_norm/"
RATE = "firing_rate/"
MAX_NAMED_LAYERS = 24  # beyond this the layer axis shows indices, not names
PathLike = str | os.PathLike
Records = list[dict[str, Any]]  # metrics.jsonl records, one dict per line


def read_metrics(path: PathLike) -> Records:
    """The records of a ``metrics.jsonl``, one dict per line, in file order.

    Blank lines are skipped, and so is a truncated last line (a run killed mid-write); any
    other unreadable line raises ``ValueError`` naming the file and the line.
    """
    lines = Path(path).read_text().splitlines()
    records = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as err:
            if number < len(lines):
                raise ValueError(f"{path}: line {number} is not JSON ({err.msg})") from None
    return records


def _records(run_dir: PathLike) -> Records:
    """A run's ``metrics.jsonl`` records; ``FileNotFoundError`` naming it when there is none."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no metrics file (is {run_dir} a spikegrad run?)")
    return read_metrics(path)


def _epochs(run_dir: PathLike, records: Records | None = None) -> Records:
    """A run's epoch records sorted by epoch; of a repeated epoch (a resumed run), the last."""
    records = _records(run_dir) if records is None else records
    by_epoch = {r["epoch"]: r for r in records if r.get("kind") == "epoch"}
    if not by_epoch:
        raise ValueError(f"{Path(run_dir) / 'metrics.jsonl'}: no epoch records yet, nothing to plot")
    return [by_epoch[e] for e in sorted(by_epoch)]


def _steps(records: Records) -> Records:
    """The step records that carry values, sorted by step; of a repeated step (a resumed run
    logs the steps after its checkpoint again), the last. Skipped-step notes are left out."""
    by_step = {r["step"]: r for r in records
               if r.get("kind") == "step" and "step" in r and "skipped" not in r}
    return [by_step[s] for s in sorted(by_step)]


def _step_to_epoch(epochs: Records) -> Any:
    """A function mapping global steps to the epoch axis: an epoch record's step lands on its
    ``epoch`` (epochs are counted from 1 at their end), step 0 on 0, linear in between."""
    xp = [0.0] + [float(r["step"]) for r in epochs if "step" in r]
    fp = [0.0] + [float(r["epoch"]) for r in epochs if "step" in r]
    return lambda steps: np.interp(np.asarray(steps, dtype=float), xp, fp)


def _series(epochs: Records, prefix: str) -> tuple[list[str], np.ndarray]:
    """Layer names under ``prefix`` (logged order) and values ``[epochs, layers]``, NaN if absent."""
    names = list(dict.fromkeys(k[len(prefix):] for r in epochs for k in r if k.startswith(prefix)))
    values = [[r.get(prefix + name, np.nan) for name in names] for r in epochs]
    return names, np.array(values, dtype=float).reshape(len(epochs), len(names))


def _column(epochs: Records, key: str) -> np.ndarray:
    """``key`` of each epoch record, NaN where absent: shape ``[epochs]``."""
    return np.array([r.get(key, np.nan) for r in epochs], dtype=float)


def _logged(record: dict[str, Any], prefix: str) -> bool:
    """True when ``record`` holds a per-layer value under ``prefix``."""
    return any(k.startswith(prefix) for k in record)


def _has(epochs: Records, key: str) -> bool:
    """True when some record holds ``key``."""
    return any(key in r for r in epochs)


def _positive(values: np.ndarray) -> np.ndarray:
    """``values`` with non-positive entries as NaN, for a log axis."""
    return np.where(values > 0, values, np.nan)


def _save(fig: Figure, path: Path) -> Path:
    """Write ``fig`` as a PNG at ``path`` (creating its directory); returns ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    return path


# one run: test and train in two colours; several runs (one colour each): filled circles
# for test, open squares for train; the line style differs too
_SPLITS = {"test_acc": ("test", "tab:blue", "-", "o", None), "train_acc": ("train", "tab:orange", "--", "s", "none")}


def _epoch_axis(ax: Axes) -> None:
    """Whole epochs only on the x axis."""
    ax.set_xlabel("epoch")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))


def _plot_accuracy(ax: Axes, epochs: Records, label: str = "", color: Any = None) -> None:
    """Test and train accuracy (percent) against epoch; ``color`` (several runs) keeps one
    colour per run, and test and train differ by marker."""
    x = _column(epochs, "epoch")
    prefix = f"{label} " if label else ""
    for key, (split, own_color, style, marker, face) in _SPLITS.items():
        if _has(epochs, key):
            ax.plot(x, _column(epochs, key), style, marker=marker, markersize=4 if color is None else 5,
                    color=own_color if color is None else color,
                    markerfacecolor=None if color is None else face, label=f"{prefix}{split}")
    _epoch_axis(ax)
    ax.set(ylabel="accuracy (%)", title="Accuracy")
    ax.yaxis.set_major_formatter(PercentFormatter(xmax=100))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)


def _plot_curves(epochs: Records, steps: Records, path: Path) -> Path:
    """Accuracy | train loss with lambda on a twin axis: per step where the step records
    hold it (a per-step schedule moves it within an epoch), else per epoch."""
    fig = Figure(figsize=(11, 4), layout="constrained")
    acc, loss = fig.subplots(1, 2)
    _plot_accuracy(acc, epochs)
    x = _column(epochs, "epoch")
    lines = loss.plot(x, _column(epochs, "train_loss"), marker="o", markersize=4, color="tab:orange",
                      label="train loss (epoch mean)")
    _epoch_axis(loss)
    loss.set(ylabel="train loss", title="Training loss")
    loss.grid(alpha=0.3)
    stepped = [r for r in steps if r.get("lambda") is not None]
    if stepped or _has(epochs, "lambda"):
        twin = loss.twinx()
        if stepped:
            at = _step_to_epoch(epochs)([r["step"] for r in stepped])
            lines += twin.plot(at, _column(stepped, "lambda"), color="tab:red", linewidth=1.2,
                               drawstyle="steps-post", label="\u03bb (branch weight), per step")
        else:
            lines += twin.plot(x, _column(epochs, "lambda"), "--", color="tab:red", marker="D",
                               markersize=4, label="\u03bb (branch weight), per epoch")
        twin.set_ylabel("\u03bb")
        twin.set_ylim(-0.05, max(1.05, float(np.nanmax(_column(stepped or epochs, "lambda"))) + 0.05))
    loss.legend(lines, [line.get_label() for line in lines], fontsize=8)
    return _save(fig, path)


def _plot_steps(epochs: Records, steps: Records, path: Path) -> Path:
    """The per-step records against the global step: loss | learning rate | lambda (when
    logged), each epoch's end a dotted line labelled with its number."""
    panels = [key for key in ("loss", "lr", "lambda") if any(r.get(key) is not None for r in steps)]
    titles = {"loss": "Training loss (per logged step)", "lr": "Learning rate",
              "lambda": "\u03bb (branch weight)"}
    fig = Figure(figsize=(4.2 * len(panels) + 1, 3.8), layout="constrained")
    axes = np.atleast_1d(fig.subplots(1, len(panels)))
    x = np.array([r["step"] for r in steps], dtype=float)
    ends = [(r["step"], r["epoch"]) for r in epochs if "step" in r]
    every = max(1, len(ends) // 12)  # at most about a dozen epoch labels
    for ax, key, color in zip(axes, panels, ("tab:orange", "tab:green", "tab:red")):
        ax.plot(x, _column(steps, key), color=color, linewidth=1, marker="." if len(x) <= 60 else None)
        for i, (end, epoch) in enumerate(ends):
            ax.axvline(end, color="grey", linestyle=":", linewidth=0.8)
            if i % every == 0 or i == len(ends) - 1:
                ax.text(end, 1.0, f" {epoch}", transform=ax.get_xaxis_transform(), fontsize=7,
                        color="grey", ha="left", va="top")
        ax.set(xlabel="step (dotted: end of epoch N)", title=titles[key])
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
    if "loss" in panels:
        axes[panels.index("loss")].set_ylabel("loss")
    return _save(fig, path)


def _layer_line(ax: Axes, norms: np.ndarray, ratio: bool, **style: Any) -> None:
    """One line of per-layer norms ``[layers]``; with ``ratio``, divided by the last layer's."""
    ax.plot(_positive(norms / norms[-1] if ratio else norms), marker=".", **style)


def _layer_axes(ax: Axes, names: list[str], ratio: bool) -> None:
    """Log y, layers on x (named when few enough), titles of the absolute or ``ratio`` panel."""
    ax.set_yscale("log")
    ax.set_xlabel("layer (shallow \u2192 deep)")
    if len(names) <= MAX_NAMED_LAYERS:
        ax.set_xticks(range(len(names)), names, rotation=90, fontsize=7)
    if ratio:
        ax.axhline(1.0, color="grey", linewidth=0.8)
        ax.set(ylabel="norm / last layer's norm", title="Relative to the last layer")
    else:
        ax.set(ylabel="\u2016\u2207W\u2016\u2082", title="Gradient norm per layer")
    ax.grid(alpha=0.3, which="both")


def _plot_grad_norms(epochs: Records, path: Path) -> Path:
    """Per-layer gradient norms, one line per epoch coloured by epoch: absolute | relative."""
    names, norms = _series(epochs, GRAD)
    x = _column(epochs, "epoch")
    scale = Normalize(x.min(), x.max() if x.max() > x.min() else x.min() + 1)
    fig = Figure(figsize=(12, 4.5), layout="constrained")
    axes = fig.subplots(1, 2)
    for ax, ratio in zip(axes, (False, True)):
        for row, color in zip(norms, colormaps["viridis"](scale(x))):
            _layer_line(ax, row, ratio, color=color, linewidth=1)
        _layer_axes(ax, names, ratio)
    fig.colorbar(ScalarMappable(scale, "viridis"), ax=axes, label="epoch",
                 ticks=MaxNLocator(integer=True))
    return _save(fig, path)


def _plot_firing_rates(epoch: dict[str, Any], path: Path) -> Path:
    """Bars of one epoch record's per-layer firing rates."""
    names, rates = _series([epoch], RATE)
    fig = Figure(figsize=(max(6, 0.3 * len(names) + 2), 4), layout="constrained")
    ax = fig.subplots()
    ax.bar(range(len(names)), rates[0], color="tab:blue")
    ax.set(ylabel="spikes / neuron / step", xlabel="neuron layer (shallow \u2192 deep)",
           title=f"Firing rate per layer (epoch {epoch['epoch']})")
    ax.set_xticks(range(len(names)), names, rotation=90, fontsize=7)
    ax.grid(alpha=0.3, axis="y")
    return _save(fig, path)


def plot_run(run_dir: PathLike) -> list[Path]:
    """Draw a run's figures into ``run_dir/plots/``; returns the paths written.

    ``curves.png`` always; ``grad_norms.png`` when the run logged ``grad_norm/<layer>``;
    ``firing_rates.png`` (from the last epoch that logged ``firing_rate/<layer>``) when it did;
    ``steps.png`` when it logged step records (loss, lr, lambda every ``log_every`` steps).
    Raises ``FileNotFoundError`` without a ``metrics.jsonl``, ``ValueError`` without epoch records.
    """
    records = _records(run_dir)
    epochs, steps = _epochs(run_dir, records), _steps(records)
    out = Path(run_dir) / "plots"
    written = [_plot_curves(epochs, steps, out / "curves.png")]
    if any(_logged(r, GRAD) for r in epochs):
        written.append(_plot_grad_norms(epochs, out / "grad_norms.png"))
    rated = [r for r in epochs if _logged(r, RATE)]
    if rated:
        written.append(_plot_firing_rates(rated[-1], out / "firing_rates.png"))
    if steps:
        written.append(_plot_steps(epochs, steps, out / "steps.png"))
    return written


def _method(run_dir: Path) -> str | None:
    """The run's ``method.name`` from its ``config.yaml``, or None when it cannot be read."""
    try:
        method = yaml.safe_load((run_dir / "config.yaml").read_text())["method"]
        return str(method["name"] if isinstance(method, dict) else method)
    except (OSError, yaml.YAMLError, KeyError, TypeError):
        return None


def _labelled(run_dirs: Mapping[str, PathLike] | Sequence[PathLike]) -> dict[str, Path]:
    """``{label: run directory}``; a plain sequence is labelled by the directories' names and
    each run's method (``fmnist-a (vanilla)``), unless the name already says the method."""
    if isinstance(run_dirs, Mapping):
        return {label: Path(d) for label, d in run_dirs.items()}
    labelled = {}
    for d in map(Path, run_dirs):
        method = _method(d)
        label = d.name if method is None or method in d.name else f"{d.name} ({method})"
        labelled[label if label not in labelled else str(d)] = d
    return labelled


def plot_compare(run_dirs: Mapping[str, PathLike] | Sequence[PathLike], out_path: PathLike) -> Path:
    """Runs side by side in one PNG: accuracy | per-layer gradient norms | ratio to the last layer.

    ``run_dirs``: ``{label: run directory}``, or directories labelled by their names. Gradient
    norms are drawn for each run's first (solid) and last (dotted) epoch. Returns ``out_path``.
    """
    runs = {label: _epochs(d) for label, d in _labelled(run_dirs).items()}
    fig = Figure(figsize=(16, 4.5), layout="constrained")
    acc, *panels = fig.subplots(1, 3)
    palette = colormaps["tab10"].colors
    widest: list[str] = []
    for i, (label, epochs) in enumerate(runs.items()):
        color = palette[i % len(palette)]
        _plot_accuracy(acc, epochs, label, color)
        widest = max(widest, _first_and_last_norms(panels, label, epochs, color), key=len)
    for ax, ratio in zip(panels, (False, True)):
        _layer_axes(ax, widest, ratio)
        if ax.lines:
            ax.legend(fontsize=7)
    return _save(fig, Path(out_path))


def _first_and_last_norms(panels: Sequence[Axes], label: str, epochs: Records,
                          color: Any) -> list[str]:
    """Draw one run's first (solid) and last (dotted) epoch norms on the absolute and ratio
    panels; returns its layer names (empty if it logged no gradient norms)."""
    names, norms = _series(epochs, GRAD)
    if not names:
        return names
    for i, style in zip(dict.fromkeys([0, len(epochs) - 1]), ("-", ":")):
        for ax, ratio in zip(panels, (False, True)):
            _layer_line(ax, norms[i], ratio, color=color, linestyle=style,
                        label=f"{label} epoch {epochs[i]['epoch']}")
    return names


def plot_sweep(key: str, values: Sequence[str], cells: Mapping[str, Mapping[str, Mapping[str, list[float]]]],
               out_path: PathLike) -> Path:
    """An ablation over the ``values`` of config ``key``, one PNG of three panels against the value:
    final test accuracy, its gap to ``vanilla``, and the first / last layer gradient-norm ratio
    (log scale). ``cells[method][value]`` holds per-seed lists under ``final_acc`` and
    ``grad_ratio``; points are seed means, bars their sample std. Returns ``out_path``."""
    fig = Figure(figsize=(15, 4.2), layout="constrained")
    acc, gap, ratio = fig.subplots(1, 3)
    x = np.arange(len(values))
    palette = colormaps["tab10"].colors
    baseline = cells.get("vanilla")
    for i, (method, by_value) in enumerate(cells.items()):
        style = {"color": palette[i % len(palette)], "marker": "o", "capsize": 3, "label": method}
        finals = [np.asarray(by_value[v]["final_acc"], float) for v in values]
        acc.errorbar(x, [f.mean() for f in finals], [_std(f) for f in finals], **style)
        if baseline is not None and method != "vanilla":
            base = [np.asarray(baseline[v]["final_acc"], float).mean() for v in values]
            gap.errorbar(x, [f.mean() - b for f, b in zip(finals, base)], [_std(f) for f in finals], **style)
        ratios = [_positive(np.asarray(by_value[v]["grad_ratio"], float)) for v in values]
        ratio.plot(x, [np.exp(np.log(r).mean()) for r in ratios], marker="o", color=style["color"], label=method)
    gap.axhline(0.0, color="grey", linewidth=0.8)
    titles = ("final test accuracy (%)", "gap to vanilla (points)", "first / last layer grad norm")
    for ax, title in zip((acc, gap, ratio), titles):
        ax.set_xticks(x, list(values))
        ax.set_xlabel(key)
        ax.set_title(title)
        if ax.lines:
            ax.legend(fontsize=8)
    ratio.set_yscale("log")
    return _save(fig, Path(out_path))


def _std(values: np.ndarray) -> float:
    """Sample standard deviation (0 for a single value)."""
    return float(values.std(ddof=1)) if values.size > 1 else 0.0

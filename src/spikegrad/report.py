"""``report.md`` of a run: accuracy (final beside best), firing, SOPs, gradients, timing."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from .config import Config
from .monitor import E_AC_PJ, E_MAC_PJ, energy

__all__ = ["write"]


def _grad_summary(last: dict) -> list[str]:
    norms = [(k.split("/", 1)[1], v) for k, v in last.items() if k.startswith("grad_norm/")]
    if not norms:
        return []
    first, deepest = norms[0], norms[-1]
    ratio = first[1] / deepest[1] if deepest[1] else float("inf")
    return ["## Gradients (last epoch, mean per step)", "",
            f"- first layer `{first[0]}`: {first[1]:.4g}",
            f"- last layer `{deepest[0]}`: {deepest[1]:.4g}",
            f"- first / last: {ratio:.3g} (far below 1 means the shallow layers get little gradient)", ""]


def _firing_summary(last: dict) -> list[str]:
    rates = {k.split("/", 1)[1]: v for k, v in last.items() if k.startswith("firing_rate/")}
    if not rates:
        return []
    mean = sum(rates.values()) / len(rates)
    overall = ([f"- all neurons: {last['firing_rate']:.4f} (every spike over every neuron output: the "
                f"mean over layers weighted by their size)"] if "firing_rate" in last else [])
    return ["## Firing rates (test set, spikes per neuron per step)", "", *overall,
            f"- mean over {len(rates)} layers: {mean:.4f}; "
            f"min {min(rates.values()):.4f}, max {max(rates.values()):.4f}", ""]


def _plural(count: int, word: str) -> str:
    """``1 epoch``, ``2 epochs``."""
    return f"{count} {word}{'' if count == 1 else 's'}"


def _test_set(cfg: Config, test_size: int | None) -> str:
    """Which test images the accuracies are on: their number when known, and ``data.limit_test``."""
    if test_size is not None:
        limited = cfg.data.limit_test is not None and test_size <= cfg.data.limit_test
        return (f"on {test_size} {cfg.data.name} test images"
                + (f" (the first {test_size}: data.limit_test = {cfg.data.limit_test})" if limited else ""))
    if cfg.data.limit_test is not None:
        return f"on the first {cfg.data.limit_test} {cfg.data.name} test images (data.limit_test)"
    return f"on the whole {cfg.data.name} test set"


def write(run_dir: str | Path, cfg: Config, history: list[dict], ops: dict[str, Any],
          test_size: int | None = None) -> Path:
    """Write ``run_dir/report.md`` from the epoch records and a ``SynapticOps`` summary;
    ``test_size``: the number of test images evaluated (else described from ``data.limit_test``)."""
    run_dir = Path(run_dir)
    last = history[-1] if history else {}
    best = max((h["test_acc"] for h in history), default=float("nan"))
    expected = (f"{cfg.expected_accuracy}% ({cfg.expected_source})"
                if cfg.expected_accuracy is not None else "none recorded")
    total_time = sum(h.get("epoch_time", 0.0) for h in history)
    cost = energy(ops) if ops else None
    lines = [
        f"# {cfg.name}", "",
        f"{cfg.model.name}, T={cfg.model.T}, method {cfg.method.name}, loss {cfg.loss.name}, "
        f"surrogate {cfg.surrogate.get('name')}, {cfg.data.name}, {_plural(len(history), 'epoch')}", "",
        "## Accuracy (exported model: main head only)", "",
        f"Test accuracy {_test_set(cfg, test_size)}.", "",
        f"- final test accuracy: {last.get('test_acc', float('nan')):.2f}%",
        f"- best test accuracy: {best:.2f}%",
        f"- paper's number: {expected}", "",
        *_firing_summary(last),
        "## Synaptic operations (per sample)", "",
        f"- SOPs (spike-driven accumulates): {ops.get('sops', 0):.4g}",
        f"- MACs (analog inputs, e.g. the first layer): {ops.get('macs', 0):.4g}",
        *([f"- energy estimate: {cost['snn']:.4g} pJ vs {cost['ann']:.4g} pJ for the ANN "
           f"(ratio {cost['ratio']:.3f}), at {E_AC_PJ:g} pJ per accumulate (AC) and {E_MAC_PJ:g} pJ "
           "per multiply-accumulate (MAC): 32-bit float in a 45 nm process (Horowitz, ISSCC 2014), "
           "the SNN papers' usual figures; memory access is not counted"] if cost else []), "",
        *_grad_summary(last),
        "## Timing", "",
        f"- training time: {total_time:.1f} s "
        f"({total_time / max(len(history), 1):.1f} s per epoch, "
        f"{last.get('samples_per_s', 0):.0f} samples/s in the last epoch)", "",
        "Plots: `plots/`. Metrics: `metrics.jsonl`. Resolved config: `config.yaml`.", "",
    ]
    path = run_dir / "report.md"
    path.write_text("\n".join(lines))
    return path

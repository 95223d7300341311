"""plots: figures of a run and a comparison from synthetic metrics.jsonl files."""
import json

import numpy as np
import pytest
import yaml
from matplotlib.ticker import PercentFormatter

from spikegrad import plots
from spikegrad.plots import plot_compare, plot_run, read_metrics

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
LAYERS = ["conv1", "layer1.0.conv1", "layer2.0.conv1", "fc"]


def epoch_record(epoch: int, full: bool) -> dict:
    record = {"kind": "epoch", "epoch": epoch, "step": 10 * (epoch + 1), "time": 1.5 * epoch,
              "train_loss": 2.0 / (epoch + 1), "train_acc": 0.5 + 0.1 * epoch,
              "test_acc": 0.45 + 0.1 * epoch, "lr": 0.1}
    if full:
        record["lambda"] = 1.0 - epoch / 3
        record.update({f"grad_norm/{n}": 10.0 ** (i - 3) * (epoch + 1)
                       for i, n in enumerate(LAYERS)})
        record.update({f"firing_rate/lif{i}": 0.1 * (i + 1) for i in range(3)})
    return record


def write_run(run_dir, epochs: int, full: bool = True, tail: str = "", method: str | None = None) -> None:
    """A run directory whose metrics.jsonl has step and epoch lines, then ``tail`` verbatim
    (and a config.yaml naming ``method`` when given)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    lines = []
    for e in range(epochs):
        lines.append({"kind": "step", "epoch": e, "step": 10 * e + 5, "time": 1.0 * e, "loss": 1.0})
        lines.append(epoch_record(e, full))
    text = "".join(json.dumps(line) + "\n" for line in lines)
    (run_dir / "metrics.jsonl").write_text(text + tail)
    if method is not None:
        (run_dir / "config.yaml").write_text(yaml.safe_dump({"name": run_dir.name, "method": {"name": method}}))


def per_step_run(run_dir, epochs: int = 3, steps: int = 8) -> None:
    """A run logged every step (epochs counted from 1 at their end, as the trainer logs them)
    with lambda falling per step from 1 to 0, and a resume that logged steps 9-10 twice."""
    run_dir.mkdir(parents=True, exist_ok=True)
    total, lines = epochs * steps, []
    for s in range(1, total + 1):
        lam = 1 - (s - 1) / (total - 1)
        lines.append({"kind": "step", "epoch": (s - 1) // steps, "step": s, "time": s, "loss": 2.0 - s / total,
                      "lr": 0.1 * (1 - s / total), "lambda": lam})
        if s % steps == 0:
            lines.append({**epoch_record(s // steps - 1, True), "epoch": s // steps, "step": s, "lambda": lam,
                          "train_acc": 40.0 + s, "test_acc": 38.0 + s})
    lines[9:9] = [dict(lines[8 + i], loss=9.0) for i in range(2)]          # stale copies, replaced later
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))


@pytest.fixture
def figures(monkeypatch):
    """The figures the plot functions save, by file name."""
    saved = {}
    real = plots._save

    def keep(fig, path):
        saved[path.name] = fig
        return real(fig, path)

    monkeypatch.setattr(plots, "_save", keep)
    return saved


def integer_ticks(ax) -> bool:
    low, high = ax.get_xlim()
    ticks = [t for t in ax.get_xticks() if low <= t <= high]
    return bool(ticks) and all(float(t).is_integer() for t in ticks)


def assert_png(path) -> None:
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC
    assert len(data) > 10_000


def test_read_metrics_skips_a_truncated_last_line(tmp_path):
    write_run(tmp_path, 2, tail='{"kind": "epoch", "epo')
    records = read_metrics(tmp_path / "metrics.jsonl")
    assert [r["kind"] for r in records] == ["step", "epoch", "step", "epoch"]


def test_read_metrics_names_a_broken_line_in_the_middle(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"kind": "step"}\nnot json\n{"kind": "step"}\n')
    with pytest.raises(ValueError, match="line 2"):
        read_metrics(path)


def test_plot_run_writes_four_figures(tmp_path):
    write_run(tmp_path, 4, tail='{"kind": "ep')
    paths = plot_run(tmp_path)
    assert [p.name for p in paths] == ["curves.png", "grad_norms.png", "firing_rates.png", "steps.png"]
    for path in paths:
        assert path.parent == tmp_path / "plots"
        assert_png(path)


def test_plot_run_with_one_epoch_and_no_optional_keys(tmp_path):
    write_run(tmp_path / "bare", 1, full=False)
    (tmp_path / "bare" / "metrics.jsonl").write_text(
        "".join(line + "\n" for line in (tmp_path / "bare" / "metrics.jsonl").read_text().splitlines()
                if '"step"' not in line.split(",")[0]))                   # epoch records only
    paths = plot_run(tmp_path / "bare")
    assert [p.name for p in paths] == ["curves.png"]
    assert_png(paths[0])
    write_run(tmp_path / "one", 1)
    assert len(plot_run(tmp_path / "one")) == 4


def test_plot_run_without_epochs_says_so(tmp_path):
    (tmp_path / "metrics.jsonl").write_text(json.dumps({"kind": "step", "epoch": 0}) + "\n")
    with pytest.raises(ValueError, match="no epoch records"):
        plot_run(tmp_path)
    with pytest.raises(FileNotFoundError, match="no metrics file"):
        plot_run(tmp_path / "missing")


@pytest.mark.parametrize("as_dict", [True, False])
def test_plot_compare_writes_one_figure(tmp_path, as_dict):
    for name, epochs in (("vanilla", 3), ("shortcut", 3), ("evolutionary", 1)):
        write_run(tmp_path / name, epochs)
    write_run(tmp_path / "nograd", 2, full=False)
    names = ["vanilla", "shortcut", "evolutionary", "nograd"]
    runs = {n: tmp_path / n for n in names} if as_dict else [tmp_path / n for n in names]
    out = plot_compare(runs, tmp_path / "compare" / "methods.png")
    assert out == tmp_path / "compare" / "methods.png"
    assert_png(out)


def test_curves_have_integer_epochs_percent_and_coloured_splits(tmp_path, figures):
    per_step_run(tmp_path)
    plot_run(tmp_path)
    acc, loss, twin = figures["curves.png"].axes
    assert integer_ticks(acc) and integer_ticks(loss)
    assert "%" in acc.get_ylabel() and isinstance(acc.yaxis.get_major_formatter(), PercentFormatter)
    test, train = acc.get_lines()
    assert (test.get_label(), train.get_label()) == ("test", "train")
    assert test.get_color() != train.get_color() and test.get_marker() != train.get_marker()
    # lambda per step: one point per logged step (24), on the epoch axis, falling 1 -> 0
    (lam,) = twin.get_lines()
    x, y = lam.get_data()
    assert len(x) == 24 and "per step" in lam.get_label()
    assert np.isclose(x[7], 1.0) and np.isclose(x[-1], 3.0) and y[0] == 1.0 and y[-1] == 0.0
    assert np.all(np.diff(y) < 0)


def test_lambda_per_epoch_when_steps_do_not_log_it(tmp_path, figures):
    write_run(tmp_path, 3)
    plot_run(tmp_path)
    (lam,) = figures["curves.png"].axes[2].get_lines()
    assert len(lam.get_xdata()) == 3 and "per epoch" in lam.get_label()


def test_steps_figure_plots_the_per_step_records(tmp_path, figures):
    per_step_run(tmp_path)
    paths = plot_run(tmp_path)
    assert paths[-1].name == "steps.png"
    assert_png(paths[-1])
    axes = figures["steps.png"].axes
    assert [ax.get_title() for ax in axes] == ["Training loss (per logged step)", "Learning rate",
                                               "\u03bb (branch weight)"]
    loss = axes[0].get_lines()[0]
    assert list(loss.get_xdata()) == list(range(1, 25))                  # resumed duplicates: the last kept
    assert 9.0 not in loss.get_ydata()
    assert [line.get_xdata()[0] for line in axes[0].get_lines()[1:]] == [8, 16, 24]   # epoch ends
    assert integer_ticks(axes[0])


def test_compare_labels_runs_by_name_and_method_and_tells_splits_by_marker(tmp_path, figures):
    write_run(tmp_path / "run-a", 3, method="vanilla")
    write_run(tmp_path / "run-b", 3, method="evolutionary")
    write_run(tmp_path / "cifar-shortcut", 2, method="shortcut")       # the name says it already
    write_run(tmp_path / "no-config", 2)
    plot_compare([tmp_path / n for n in ("run-a", "run-b", "cifar-shortcut", "no-config")], tmp_path / "c.png")
    acc = figures["c.png"].axes[0]
    labels = [line.get_label() for line in acc.get_lines()]
    assert labels[:4] == ["run-a (vanilla) test", "run-a (vanilla) train",
                          "run-b (evolutionary) test", "run-b (evolutionary) train"]
    assert labels[4:] == ["cifar-shortcut test", "cifar-shortcut train", "no-config test", "no-config train"]
    test, train = acc.get_lines()[:2]
    assert test.get_color() == train.get_color() and test.get_marker() != train.get_marker()
    assert integer_ticks(acc) and "%" in acc.get_ylabel()

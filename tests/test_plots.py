"""plots: figures of a run and a comparison from synthetic metrics.jsonl files."""
import json

import pytest

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


def write_run(run_dir, epochs: int, full: bool = True, tail: str = "") -> None:
    """A run directory whose metrics.jsonl has step and epoch lines, then ``tail`` verbatim."""
    run_dir.mkdir(parents=True, exist_ok=True)
    lines = []
    for e in range(epochs):
        lines.append({"kind": "step", "epoch": e, "step": 10 * e + 5, "time": 1.0 * e, "loss": 1.0})
        lines.append(epoch_record(e, full))
    text = "".join(json.dumps(line) + "\n" for line in lines)
    (run_dir / "metrics.jsonl").write_text(text + tail)


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


def test_plot_run_writes_three_figures(tmp_path):
    write_run(tmp_path, 4, tail='{"kind": "ep')
    paths = plot_run(tmp_path)
    assert [p.name for p in paths] == ["curves.png", "grad_norms.png", "firing_rates.png"]
    for path in paths:
        assert path.parent == tmp_path / "plots"
        assert_png(path)


def test_plot_run_with_one_epoch_and_no_optional_keys(tmp_path):
    write_run(tmp_path / "bare", 1, full=False)
    paths = plot_run(tmp_path / "bare")
    assert [p.name for p in paths] == ["curves.png"]
    assert_png(paths[0])
    write_run(tmp_path / "one", 1)
    assert len(plot_run(tmp_path / "one")) == 3


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

"""What a finished run tells its user: report.md (epochs, test-set size, the energy
estimate's constants) and `eval` (test-set size beside the run's; a .nir's own layer
names), on one tiny run through the CLI."""
import json
import math

import pytest

from spikegrad import report
from spikegrad.cli import main
from spikegrad.config import load_config

TINY = ["epochs=1", "data.limit_train=128", "data.limit_test=100", "model.width=0.125",
        "model.T=2", "batch_size=32", "log_every=1", "neuron.backend=eager"]


def _sets(items):
    return [arg for item in items for arg in ("--set", item)]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("runs")
    main(["train", "--config", "configs/default.yaml", *_sets(TINY + [f"out={out}", "name=tiny"])])
    return out / "tiny"


def test_report_says_epoch_test_set_and_energy_constants(run_dir):
    text = (run_dir / "report.md").read_text()
    assert ", 1 epoch\n" in text and "1 epochs" not in text
    assert "Test accuracy on the first 100 fashion-mnist test images (data.limit_test)" in text
    assert "0.9 pJ per accumulate (AC) and 4.6 pJ per multiply-accumulate (MAC)" in text
    assert "45 nm" in text
    epoch = [m for m in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())
             if m["kind"] == "epoch"][-1]
    assert f"- all neurons: {epoch['firing_rate']:.4f} (every spike over every neuron output:" in text


def test_report_of_several_epochs_and_a_known_test_size(tmp_path):
    cfg = load_config("configs/default.yaml", [])
    history = [{"test_acc": 50.0 + e, "train_loss": 1.0, "epoch_time": 2.0} for e in range(3)]
    ops = {"sops": 1e6, "macs": 1e5, "ann_macs": 1e7}
    text = report.write(tmp_path, cfg, history, ops, test_size=10000).read_text()
    assert ", 3 epochs\n" in text and "Test accuracy on 10000 fashion-mnist test images." in text
    assert "final test accuracy: 52.00%" in text and "best test accuracy: 52.00%" in text
    cfg.data.limit_test = 500
    text = report.write(tmp_path, cfg, history[:1], {}, test_size=500).read_text()
    assert "on 500 fashion-mnist test images (the first 500: data.limit_test = 500)" in text
    assert "energy estimate" not in text and ", 1 epoch\n" in text
    assert math.isclose(report.energy(ops)["ratio"], (1e6 * 0.9 + 1e5 * 4.6) / (1e7 * 4.6))


def test_eval_says_when_its_test_set_differs_from_the_runs(run_dir, capsys):
    last = str(run_dir / "checkpoints" / "last.pt")
    main(["eval", last, "--limit", "50"])
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("test accuracy:") and "on 50 fashion-mnist images" in lines[0]
    assert lines[1] == ("  the run's own test accuracy (metrics.jsonl, report.md) used the first 100 "
                        "images (data.limit_test); this eval used 50")
    main(["eval", last, "--limit", "100"])
    assert "the run's own" not in capsys.readouterr().out


def test_eval_of_a_nir_file_names_the_models_layers(run_dir, tmp_path, capsys):
    path = tmp_path / "model.nir"
    main(["export", str(run_dir / "checkpoints" / "best.pt"), str(path)])
    captured = capsys.readouterr()
    assert "dt=0.0001" in captured.out and captured.err == ""             # the default: no warning
    main(["eval", str(path), "--limit", "50"])
    out = capsys.readouterr().out
    layers = [line.split() for line in out.splitlines() if line.startswith("  firing rate ")]
    assert [words[2].rstrip(":") for words in layers] == ["stage1.sn1", "stage1.sn2", "stage1.sn3", "stage2.sn1",
                                                           "stage2.sn2", "stage2.sn3", "stage3.sn1", "stage3.sn2"]
    (overall,) = [float(line.split()[-1]) for line in out.splitlines() if line.startswith("  firing rate, all")]
    assert min(float(w[3]) for w in layers) <= overall <= max(float(w[3]) for w in layers)


def test_export_with_another_dt_warns_in_one_line(run_dir, tmp_path, capsys):
    main(["export", str(run_dir / "checkpoints" / "best.pt"), str(tmp_path / "model.nir"), "--dt", "1"])
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith("spikegrad: warning: NIR export with dt=1: snnTorch's importer "
                                               "assumes dt=1e-4 and will silently misread the neurons")
    assert (tmp_path / "model.nir").is_file()

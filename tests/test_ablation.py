"""Ablation: a tiny vanilla/shortcut x 2 seeds run on a subset of the embedded data writes the
table and the figure; re-running skips finished runs, resumes unfinished ones and refuses
run directories made with another config. One intra-op thread (see test_configs.py)."""
import argparse
import json
from pathlib import Path

import pytest
import torch

from spikegrad import ablation, train
from spikegrad.config import ConfigError, load_config

BASE = Path(__file__).resolve().parents[1] / "configs" / "default.yaml"
TINY = ["epochs=1", "data.limit_train=256", "data.limit_test=200", "model.width=0.125", "model.T=2",
        "batch_size=64", "neuron.backend=eager"]
METHODS, SEEDS = ["vanilla", "shortcut"], [0, 1]
RUNS = [f"fmnist-{m}-s{s}" for m in METHODS for s in SEEDS]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def out(tmp_path_factory):
    """The ablation run once through ``add_arguments``/``main``, as the CLI will."""
    folder = tmp_path_factory.mktemp("ablation")
    parser = argparse.ArgumentParser()
    ablation.add_arguments(parser)
    sets = [arg for item in TINY for arg in ("--set", item)]
    ablation.main(parser.parse_args(["--config", str(BASE), "--methods", ",".join(METHODS),
                                     "--seeds", str(len(SEEDS)), "--out", str(folder), *sets]))
    return folder


class NoTraining:
    """Stands in for ``Trainer`` where nothing may train."""

    def __init__(self, *args, **kwargs):
        raise AssertionError("a run was trained")


def rows(page: Path) -> dict[str, list[str]]:
    """``{method: cells}`` of the markdown table in ``page``."""
    lines = [line for line in page.read_text().splitlines() if line.startswith("| ")]
    cells = [[c.strip() for c in line.strip("|").split("|")] for line in lines[2:]]
    return {row[0]: row[1:] for row in cells}


def epoch_records(run_dir: Path) -> list[dict]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["kind"] == "epoch"]


def test_runs_are_named_name_method_seed_and_finished(out):
    for name in RUNS:
        assert (out / name / "report.md").is_file(), name
        cfg = load_config(out / name / "config.yaml")
        method, seed = name.split("-")[1], int(name[-1])
        assert (cfg.method.name, cfg.seed, cfg.epochs, cfg.model.T) == (method, seed, 1, 2)


def test_table_has_a_row_per_method_with_mean_and_std_over_seeds(out):
    table = rows(out / "fmnist-ablation.md")
    assert list(table) == METHODS
    for method, cells in table.items():
        assert cells[0] == "2" and len(cells) == 1 + len(ablation.COLUMNS)
        assert all("±" in cell for cell in cells[1:])
        runs = [ablation.summarise(out / f"fmnist-{method}-s{s}") for s in SEEDS]
        mean_best = sum(r["best_acc"] for r in runs) / len(runs)
        assert cells[1].startswith(f"{mean_best:.2f} ±")
        assert all(r["first_grad"] > 0 and r["epoch_time"] > 0 for r in runs)


def test_figure_is_a_png(out):
    assert (out / "fmnist-ablation.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_rerun_skips_finished_runs(out, monkeypatch):
    monkeypatch.setattr(train, "Trainer", NoTraining)
    (out / "fmnist-ablation.md").unlink()
    page = ablation.run_ablation(BASE, METHODS, SEEDS, TINY, str(out))
    assert list(rows(page)) == METHODS


def test_unfinished_run_is_resumed_not_retrained(out):
    run_dir = out / RUNS[0]
    before = epoch_records(run_dir)
    (run_dir / "report.md").unlink()
    ablation.run_ablation(BASE, METHODS, SEEDS, TINY, str(out))
    assert (run_dir / "report.md").is_file()
    assert epoch_records(run_dir) == before  # resumed at its end: no epoch trained again


def test_run_made_with_another_config_is_refused_before_training(out, monkeypatch):
    monkeypatch.setattr(train, "Trainer", NoTraining)
    with pytest.raises(ConfigError, match="epochs=1, this ablation asks for 2"):
        ablation.run_ablation(BASE, METHODS, SEEDS, [*TINY, "epochs=2"], str(out))


def test_name_drops_the_base_method():
    assert ablation.ablation_name(load_config(BASE)) == "fmnist"
    cfg = load_config(BASE.parent / "shortcut" / "cifar10-resnet18-t4-vanilla.yaml")
    assert ablation.ablation_name(cfg) == "cifar10-resnet18-t4"


@pytest.mark.parametrize("given, seeds", [("3", 3), ("0,5", [0, 5]), ("7,", [7])])
def test_seeds_are_a_count_or_a_list(given, seeds):
    parser = argparse.ArgumentParser()
    ablation.add_arguments(parser)
    args = parser.parse_args(["--config", "c.yaml", "--seeds", given, "--methods", "vanilla, shortcut"])
    assert args.seeds == seeds and args.methods == ["vanilla", "shortcut"]


def test_sweep_repeats_the_ablation_per_value_and_reports_the_gap(tmp_path):
    parser = argparse.ArgumentParser()
    ablation.add_arguments(parser)
    sets = [arg for item in TINY if not item.startswith("model.T") for arg in ("--set", item)]
    ablation.main(parser.parse_args(["--config", str(BASE), "--methods", "vanilla,shortcut", "--seeds", "1",
                                     "--out", str(tmp_path), "--sweep", "model.T=1,2", *sets]))
    for T in ("1", "2"):
        assert (tmp_path / f"fmnist-{T}-ablation.md").is_file()
        assert load_config(tmp_path / f"fmnist-{T}-shortcut-s0" / "config.yaml").model.T == int(T)
    table = rows(tmp_path / "fmnist-sweep.md")
    assert list(table) == ["1", "2"]
    for T, cells in table.items():
        finals = {m: ablation.summarise(tmp_path / f"fmnist-{T}-{m}-s0")["final_acc"] for m in METHODS}
        assert cells[:3] == [f"{finals['vanilla']:.2f}", f"{finals['shortcut']:.2f}",
                             f"{finals['shortcut'] - finals['vanilla']:+.2f}"]
    assert (tmp_path / "fmnist-sweep.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("given", ["model.T", "=1,2", "model.T="])
def test_bad_sweep_is_refused(given, capsys):
    parser = argparse.ArgumentParser()
    ablation.add_arguments(parser)
    with pytest.raises(SystemExit):
        parser.parse_args(["--config", "c.yaml", "--sweep", given])
    assert "--sweep takes KEY=V1,V2" in capsys.readouterr().err

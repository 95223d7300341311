"""The main job through the CLI: a short run on a subset of the embedded data."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from spikegrad import checkpoint
from spikegrad.cli import main
from spikegrad.config import ConfigError, load_config

FAST = ["epochs=2", "data.limit_train=1024", "data.limit_test=500", "model.width=0.125",
        "model.T=2", "batch_size=32", "log_every=8", "neuron.backend=eager", "method.per_step=false"]


def _sets(items):
    return [arg for item in items for arg in ("--set", item)]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("runs")
    main(["train", "--config", "configs/default.yaml",
          *_sets(FAST + [f"out={out}", "name=smoke", "optim.name=adam", "optim.lr=0.003"])])
    return out / "smoke"


def test_run_directory_has_every_file(run_dir):
    for name in ["config.yaml", "metrics.jsonl", "report.md", "checkpoints/last.pt",
                 "checkpoints/best.pt", "checkpoints/model.pt", "plots/curves.png",
                 "plots/grad_norms.png", "plots/firing_rates.png"]:
        assert (run_dir / name).is_file(), name
    resolved = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert resolved["model"]["T"] == 2 and resolved["method"]["name"] == "evolutionary"


def test_metrics_follow_the_schema_and_beat_chance(run_dir):
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    epochs = [m for m in lines if m["kind"] == "epoch"]
    assert len(epochs) == 2 and any(m["kind"] == "step" for m in lines)
    for m in epochs:
        for key in ("epoch", "step", "time", "train_loss", "train_acc", "test_acc", "lr", "lambda"):
            assert key in m, key
        assert any(k.startswith("grad_norm/") for k in m) and any(k.startswith("firing_rate/") for k in m)
        assert 0 < m["firing_rate"] < 1  # every layer's spikes over every layer's outputs
    assert [m["lambda"] for m in epochs] == [1.0, 0.0]  # evolutionary: branches first, main last
    assert epochs[-1]["test_acc"] > 20.0  # chance is 10%


def test_checkpoints_load_weights_only_and_eval_export_agree(run_dir, tmp_path, capsys):
    state = checkpoint.load(run_dir / "checkpoints" / "last.pt", kind="run")
    assert state["epoch"] == 2 and "net" in state and "optimizer" in state
    main(["eval", str(run_dir / "checkpoints" / "last.pt"), "--limit", "500"])
    from_run = capsys.readouterr().out
    out = tmp_path / "model.pt"
    main(["export", str(run_dir / "checkpoints" / "last.pt"), str(out)])
    exported = checkpoint.load(out, kind="model")
    assert not any(k.startswith("branches") for k in exported["state_dict"])
    capsys.readouterr()
    main(["eval", str(out), "--limit", "500"])
    from_export = capsys.readouterr().out
    first = lambda text: text.splitlines()[0]  # noqa: E731
    assert first(from_run) == first(from_export) and "test accuracy" in first(from_run)


def test_existing_run_directory_is_refused(run_dir, capsys):
    before = (run_dir / "metrics.jsonl").read_bytes()
    with pytest.raises(SystemExit) as exc:
        main(["train", *_sets([f"out={run_dir.parent}", "name=smoke"])])
    assert exc.value.code == 2
    assert "exists; pass --resume" in capsys.readouterr().err
    assert (run_dir / "metrics.jsonl").read_bytes() == before


@pytest.mark.parametrize("args, message", [
    (["--set", "epocs=3"], "did you mean 'epochs'"),
    (["--set", "model.T=0"], "'model.T' must be >= 1"),
    (["--set", "optim.lr=-0.1"], "'optim.lr' must be > 0"),
    (["--set", "batch_size=abc"], "'batch_size' must be of type int"),
    (["--set", "method=magic"], "'method.name' must be one of"),
    (["--config", "no/such.yaml"], "does not exist"),
])
def test_bad_config_exits_2_with_one_line(args, message, tmp_path):
    proc = subprocess.run([sys.executable, "-m", "spikegrad", "train", *args, "--set", f"out={tmp_path}"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and message in proc.stderr
    assert "Traceback" not in proc.stderr
    assert list(tmp_path.iterdir()) == []


def test_config_overrides_and_surrogate_reset():
    cfg = load_config("configs/default.yaml", ["surrogate.name=dspike", "teacher=x.pt", "loss=two"])
    assert cfg.surrogate == {"name": "dspike"} and cfg.method.teacher == "x.pt"
    assert cfg.loss.name == "two"
    cfg = load_config(None, ["surrogate.name=msg", "surrogate.p=0.3"])
    assert cfg.surrogate == {"name": "msg", "p": 0.3}
    with pytest.raises(ConfigError, match="unknown config key 'model.nme'; did you mean 'model.name'"):
        load_config(None, ["model.nme=x"])


def test_python_api_trains_in_ten_lines(tmp_path):
    from spikegrad.models import create_model
    from spikegrad.shortcut import ShortcutNet

    net = ShortcutNet(create_model("plain-8", num_classes=10, T=2, in_channels=1, width=0.125))
    x, y = torch.randn(4, 1, 28, 28), torch.randint(0, 10, (4,))
    main_out, branches = net(x)
    loss = net.loss(main_out, branches, y, 0.5, lambda o, t: torch.nn.functional.cross_entropy(o.mean(0), t))
    loss.backward()
    assert main_out.shape == (2, 4, 10) and len(branches) == 2 and torch.isfinite(loss)


def test_nir_export_and_eval_through_the_cli(run_dir, tmp_path, capsys):
    out = tmp_path / "model.nir"
    main(["export", str(run_dir / "checkpoints" / "best.pt"), str(out)])
    assert out.is_file()
    capsys.readouterr()
    main(["eval", str(out), "--limit", "500"])
    from_nir = capsys.readouterr().out.splitlines()[0]
    main(["eval", str(run_dir / "checkpoints" / "best.pt"), "--limit", "500"])
    assert capsys.readouterr().out.splitlines()[0] == from_nir


def test_list_names_come_from_the_registries(capsys):
    from spikegrad import data, layers, losses, methods, models, surrogate

    expected = {"models": models.list_models(), "surrogates": surrogate.SURROGATES.names(),
                "neurons": layers.NEURONS.names(), "methods": methods.METHODS.names(),
                "losses": losses.LOSSES.names(), "datasets": data.DATASETS.names()}
    for kind, names in expected.items():
        capsys.readouterr()
        main(["list", kind])
        assert capsys.readouterr().out.split() == names and names, kind
    main(["list", "configs"])
    configs = capsys.readouterr().out.split()
    assert "configs/default.yaml" in configs and all(c.endswith(".yaml") for c in configs)


def test_print_config_resolves_without_training(tmp_path, capsys):
    capsys.readouterr()
    main(["train", "--config", "configs/default.yaml", "--set", "model.T=3", "--set", f"out={tmp_path}",
          "--print-config"])
    printed = yaml.safe_load(capsys.readouterr().out)
    from spikegrad.config import to_dict
    assert printed == to_dict(load_config("configs/default.yaml", ["model.T=3", f"out={tmp_path}"]))
    assert printed["model"]["T"] == 3 and list(tmp_path.iterdir()) == []


def test_bare_train_is_named_apart_from_the_default_config_and_help_points_to_list():
    from spikegrad.config import Config

    assert Config().name != yaml.safe_load(open("configs/default.yaml"))["name"]
    proc = subprocess.run([sys.executable, "-m", "spikegrad", "train", "--help"], capture_output=True,
                          text=True, timeout=120)
    text = " ".join(proc.stdout.split())
    assert "spikegrad list configs" in text and "--print-config" in text and "code-defaults" in text


def test_plain_progress_lines_when_stderr_is_no_terminal(tmp_path):
    """nohup / SLURM / CI: the run directory first, then plain progress lines (no tqdm bars)."""
    proc = subprocess.run([sys.executable, "-m", "spikegrad", "train", *_sets(
        ["epochs=1", "data.limit_train=128", "data.limit_test=64", "model.width=0.125", "model.T=2",
         "batch_size=32", "neuron.backend=eager", "progress_every=0.000001", f"out={tmp_path}", "name=p"])],
        capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stderr.splitlines()
    assert lines[0] == f"spikegrad: run directory {tmp_path / 'p'} (1 epoch)"
    steps = [line for line in lines if line.startswith("epoch 1/1 step ")]
    assert [line.split(":")[0] for line in steps] == ["epoch 1/1 step 1/4", "epoch 1/1 step 2/4",
                                                      "epoch 1/1 step 3/4"]
    assert "\r" not in proc.stderr


_FAULTS_AFTER_COMMAND = """
import contextlib, io, resource, torch
from spikegrad.cli import main
with contextlib.redirect_stdout(io.StringIO()):
    main(["list", "models"])
for _ in range(2):  # 64 MiB, mapped afresh by malloc each time
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    torch.empty(16 * 2**20).fill_(1)
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def _thp_mode() -> str:
    try:
        text = Path("/sys/kernel/mm/transparent_hugepage/enabled").read_text()
    except OSError:
        return "absent"
    return text.split("[")[1].split("]")[0]


@pytest.mark.skipif(_thp_mode() not in ("always", "madvise"), reason="no transparent huge pages here")
def test_the_command_backs_large_tensors_with_huge_pages_unless_told_not_to():
    """The command turns on PyTorch's THP_MEM_ALLOC_ENABLE before torch allocates: a 64 MiB
    tensor then faults about once per 2 MiB huge page instead of on each of its 16,384 small
    pages. An explicit 0 in the environment is kept."""
    def faults(env_value: str | None) -> int:
        env = {k: v for k, v in os.environ.items() if k != "THP_MEM_ALLOC_ENABLE"}
        if env_value is not None:
            env["THP_MEM_ALLOC_ENABLE"] = env_value
        done = subprocess.run([sys.executable, "-c", _FAULTS_AFTER_COMMAND], capture_output=True,
                              text=True, env=env, check=True)
        return int(done.stdout.split()[-1])
    assert faults(None) < 4_000
    assert faults("0") > 16_000

"""The bad-input catalogue: each bad input gives one line on stderr, exit code 2, and
leaves every file already written untouched."""
import hashlib
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings, strategies as st

from spikegrad import checkpoint
from spikegrad.cli import main
from spikegrad.config import Config, ConfigError, apply_overrides, from_dict, to_dict

TINY = ["model.width=0.125", "model.T=2", "data.limit_train=64", "data.limit_test=64",
        "epochs=1", "batch_size=32", "neuron.backend=eager"]


def _sets(items):
    return [arg for item in items for arg in ("--set", item)]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A finished tiny run, plus files of every kind a bad input could damage."""
    root = tmp_path_factory.mktemp("world")
    main(["train", *_sets(TINY + [f"out={root}", "name=done"])])
    run = root / "done"
    (root / "not-a-dir").write_text("a file where a folder is expected\n")
    (root / "bad.yaml").write_text("epochs: [1,\n")
    (root / "list.yaml").write_text("- 1\n- 2\n")
    good = run / "checkpoints" / "model.pt"
    data = good.read_bytes()
    (root / "truncated.pt").write_bytes(data[: len(data) // 2])
    torch.save({"kind": "model", "payload": Path("x")}, root / "pickled.pt")  # an object, not data
    state = checkpoint.load(good)
    state["model_kwargs"] = {**state["model_kwargs"], "width": 0.25}
    checkpoint.save(state, root / "other-arch.pt")
    (root / "resume-me").mkdir()
    return root


def _snapshot(root: Path) -> dict:
    return {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*")) if p.is_file()}


CASES = {
    "unknown key": (["train", "--set", "epocs=3"], "did you mean 'epochs'"),
    "unknown nested key": (["train", "--set", "model.nme=x"], "did you mean 'model.name'"),
    "misspelled section": (["train", "--set", "optimm.lr=0.1"], "did you mean 'optim'"),
    "wrong type int": (["train", "--set", "batch_size=abc"], "'batch_size' must be of type int"),
    "float for int": (["train", "--set", "model.T=2.5"], "'model.T' must be of type int"),
    "T zero": (["train", "--set", "model.T=0"], "'model.T' must be >= 1"),
    "negative lr": (["train", "--set", "optim.lr=-0.1"], "'optim.lr' must be > 0"),
    "zero epochs": (["train", "--set", "epochs=0"], "'epochs' must be >= 1"),
    "tau below one": (["train", "--set", "neuron.tau=0.5"], "'neuron.tau' must be >= 1"),
    "bad method": (["train", "--set", "method=magic"], "'method.name' must be one of"),
    "bad optimiser": (["train", "--set", "optim.name=rmsprop"], "'optim.name' must be one of"),
    "bad nan policy": (["train", "--set", "nan_policy=maybe"], "'nan_policy' must be one of"),
    "unknown surrogate": (["train", "--set", "surrogate=tanh"], "unknown surrogate 'tanh'"),
    "bad surrogate arg": (["train", "--set", "surrogate.alpha=-1"], "alpha must be a positive number"),
    "MSG p out of range": (["train", "--set", "surrogate=msg", "--set", "surrogate.p=1.5"], "p must be in [0, 1)"),
    "missing config": (["train", "--config", "{root}/nope.yaml"], "does not exist"),
    "invalid YAML": (["train", "--config", "{root}/bad.yaml"], "is not valid YAML at line"),
    "config not a mapping": (["train", "--config", "{root}/list.yaml"], "must hold a mapping"),
    "set without =": (["train", "--set", "epochs"], "--set takes key=value"),
    "unknown model": (["train", *_sets(TINY + ["model.name=resnet99"])], "unknown model 'resnet99'"),
    "plain depth": (["train", *_sets(TINY + ["model.name=plain-50"])], "plain-N with N in 8..40"),
    "missing dataset": (["train", *_sets(TINY + ["data.root={root}/no-data"])], "no-data"),
    "unknown dataset": (["train", *_sets(TINY + ["data.name=svhn"])], "svhn"),
    "cuda without GPU": (["train", *_sets(TINY + ["device=cuda"])], "no CUDA GPU is visible"),
    "existing run dir": (["train", *_sets(TINY + ["name=done"])], "exists; pass --resume"),
    "unwritable run dir": (["train", *_sets(TINY + ["out={root}/not-a-dir", "name=x"])], "cannot write run directory"),
    "resume without last.pt": (["train", "--resume", "{root}/resume-me"], "last.pt"),
    "resume with config": (["train", "--resume", "{root}/done", "--config", "x.yaml"], "drop --config"),
    "missing checkpoint": (["eval", "{root}/none.pt"], "does not exist"),
    "truncated checkpoint": (["eval", "{root}/truncated.pt"], "is truncated or corrupted"),
    "pickled payload": (["eval", "{root}/pickled.pt"], "pickled object payload"),
    "other architecture": (["eval", "{root}/other-arch.pt"], "does not match its model"),
    "export suffix": (["export", "{root}/done/checkpoints/model.pt", "{root}/m.onnx"], "expected .pt or .nir"),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_bad_input_one_line_exit_2_nothing_touched(name, world, capsys):
    args, message = CASES[name]
    args = [a.replace("{root}", str(world)) for a in args]
    args = args + (["--set", f"out={world}"] if args[0] == "train" and "--resume" not in args
                   and not any(a.startswith("out=") for a in args) else [])
    before = _snapshot(world)
    capsys.readouterr()
    with pytest.raises(SystemExit) as exc:
        main(args)
    err = capsys.readouterr().err
    assert exc.value.code == 2
    assert err.count("\n") == 1 and err.startswith("spikegrad: error: "), err
    assert message in err, err
    assert _snapshot(world) == before


def test_catalogue_is_large_enough():
    assert len(CASES) >= 25


def test_cli_process_has_no_traceback(world):
    proc = subprocess.run([sys.executable, "-m", "spikegrad", "eval", str(world / "truncated.pt")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().count("\n") == 0


KEYS = ["epochs", "batch_size", "model.T", "optim.lr", "neuron.tau", "method.name", "loss.name",
        "model.width", "nan_policy", "seed"]
VALUES = st.one_of(st.integers(-5, 5), st.floats(-2, 2, allow_nan=False), st.booleans(), st.none(),
                   st.sampled_from(["ce", "two", "sgd", "evolutionary", "stop", "x"]))


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(KEYS), VALUES), max_size=4))
def test_config_loader_accepts_or_refuses_cleanly(pairs):
    """Any override either yields a valid config that round-trips, or one ConfigError line."""
    overrides = [f"{k}={'null' if v is None else v}" for k, v in pairs]
    try:
        cfg = from_dict(apply_overrides(to_dict(Config()), overrides))
    except ConfigError as err:
        assert "\n" not in str(err) and "config" in str(err)
        return
    assert from_dict(to_dict(cfg)) == cfg
    assert cfg.epochs >= 1 and cfg.model.T >= 1 and cfg.optim.lr > 0


@settings(max_examples=100, deadline=None)
@given(st.text(min_size=1, max_size=12).filter(lambda s: "=" not in s and "." not in s))
def test_unknown_top_level_keys_are_refused(key):
    if key in to_dict(Config()) or key == "teacher":
        return
    with pytest.raises(ConfigError, match="config key"):
        from_dict(apply_overrides(to_dict(Config()), [f"{key}=1"]))

"""Config smoke test (docs/architecture.md, "Tests"): every YAML under ``configs/`` loads,
builds its model and trains one step; every paper row names its number's source.

Speed rule (2 CPU cores, a 10-minute suite): each config's model is built at the
config's own width, then the training step (forward, the method's loss from
``methods.create``, backward) runs at batch 2 on the same config with
``model.width = STEP_WIDTH``; T, input shape, neuron, surrogate, method and loss are the
config's. Inputs are random, shaped as the dataset's loader yields them: images
``[B, C, H, W]`` (CIFAR 3x32, ImageNet 3x64 as DESIGN asks), CIFAR10-DVS events
``[T, B, 2, H, W]`` with ``H = data.size`` (the sensor's 128 when unset). The LTL step
uses the untrained ANN twin built in memory as its teacher, in place of the config's
placeholder path. The tests run on one intra-op thread: these small steps gain nothing
from more, and on a loaded 2-core machine OpenMP's waiting threads made them 10-30x slower.
"""
import dataclasses
import re
from pathlib import Path

import pytest
import torch

from spikegrad import losses, methods
from spikegrad.config import Config, load_config
from spikegrad.tandem import ann_twin
from spikegrad.train import build_model

ROOT = Path(__file__).resolve().parents[1] / "configs"
CONFIGS = sorted(ROOT.rglob("*.yaml"))
PAPER_ROWS = [p for p in CONFIGS if p.parent != ROOT]  # configs/<paper>/<row>.yaml
STEP_WIDTH = 0.125
BATCH = 2
# dataset name -> (in_channels, size, num_classes, events)
DATASETS = {"fashion-mnist": (1, 28, 10, False), "cifar10": (3, 32, 10, False),
            "cifar100": (3, 32, 100, False), "imagenet": (3, 64, 1000, False),
            "cifar10-dvs": (2, 128, 10, True)}


def _id(path: Path) -> str:
    return str(path.relative_to(ROOT))


def dataset_info(cfg: Config) -> dict:
    """``build_model``'s ``info`` for the config's dataset (``data.size`` overrides the size,
    except for ImageNet, tested at 64x64)."""
    channels, size, classes, events = DATASETS[cfg.data.name]
    if cfg.data.size is not None and cfg.data.name != "imagenet":
        size = cfg.data.size
    return {"in_channels": channels, "size": size, "num_classes": classes, "events": events}


def random_batch(cfg: Config, info: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """``(x, y)``: x ``[B, C, H, W]`` (images) or ``[T, B, C, H, W]`` (events), y ``[B]``."""
    shape = (BATCH, info["in_channels"], info["size"], info["size"])
    x = torch.rand(cfg.model.T, *shape) if info["events"] else torch.randn(shape)
    return x, torch.randint(info["num_classes"], (BATCH,))


def make_method(cfg: Config, model: torch.nn.Module, objective: losses.RateCE) -> methods.Method:
    """The config's method; for ``ltl`` with the ANN twin of ``model`` as teacher."""
    method_cfg = cfg.method
    if method_cfg.name == "ltl":
        method_cfg = dataclasses.replace(method_cfg, teacher=ann_twin(model))
    return methods.create(method_cfg, objective)


@pytest.mark.parametrize("path", CONFIGS, ids=_id)
def test_config_builds_its_model(path):
    cfg = load_config(path)
    model = build_model(cfg, dataset_info(cfg))
    assert sum(p.numel() for p in model.parameters()) > 0
    assert model.config["name"] == cfg.model.name and model.config["width"] == cfg.model.width


@pytest.fixture(autouse=True)
def one_thread():
    """One intra-op thread for the test; the previous count is restored after."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.mark.parametrize("path", CONFIGS, ids=_id)
def test_config_trains_one_step(path):
    torch.manual_seed(0)
    cfg = load_config(path, [f"model.width={STEP_WIDTH}"])
    info = dataset_info(cfg)
    model = build_model(cfg, info)
    objective = losses.from_config(cfg.loss, cfg.model.T)
    method = make_method(cfg, model, objective)
    net = method.wrap(model).train()
    method.set_progress(0, cfg.epochs, 0, 1)
    x, y = random_batch(cfg, info)
    loss, logits = method.loss(net(x), y)
    loss.backward()
    T = 1 if cfg.method.name == "ann" else cfg.model.T
    assert logits.shape == (T, BATCH, info["num_classes"])
    assert torch.isfinite(loss)
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)


@pytest.mark.parametrize("path", PAPER_ROWS, ids=_id)
def test_paper_row_is_named_by_its_file_and_sources_its_number(path):
    cfg = load_config(path)
    assert cfg.name == path.stem  # runs/<name>/ and ablation names follow the file
    assert cfg.expected_source.strip()
    if cfg.expected_accuracy is None:
        assert cfg.expected_source.startswith("no number")
    else:
        # the number, then where it comes from
        assert 0 < cfg.expected_accuracy < 100
        assert cfg.expected_source.startswith(f"{cfg.expected_accuracy:g}") or \
            cfg.expected_source.startswith(f"{cfg.expected_accuracy:.2f}")
        assert ":" in cfg.expected_source and len(cfg.expected_source.split(":", 1)[1].strip()) > 20


@pytest.mark.parametrize("path", CONFIGS, ids=_id)
def test_config_points_only_inside_the_project(path):
    """A user has the repository, not the project's planning notes or issue tracker."""
    text = path.read_text()
    for outside in ("METHODS.md", "DESIGN.md", "../shared", "shared/"):
        assert outside not in text, f"{path.name} points to {outside}"
    assert re.search(r"\bissue \d", text) is None, f"{path.name} cites an issue number"

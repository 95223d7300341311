"""The recipe table of docs/reproduce.md agrees with every config; every config path the
README and docs name exists; CIFARNet has the MSG authors' shapes; the MSG neuron written
the authors' way equals its rescaled form."""
import re
from pathlib import Path

import pytest
import torch

from spikegrad.config import Config, load_config
from spikegrad.models import create_model

REPO = Path(__file__).resolve().parents[1]
CONFIGS = sorted((REPO / "configs").rglob("*.yaml"))
REPRODUCE = REPO / "docs" / "reproduce.md"
COLUMNS = ("config", "model", "data", "optimiser", "lr", "wd", "schedule", "epochs", "batch", "T",
           "neuron", "threshold", "surrogate", "augmentation", "expected", "sources")


def _g(x: float) -> str:
    return f"{x:g}"


def _surrogate(args: dict, schedule: str, kind: str) -> str:
    name = args["name"]
    if name == "msg":
        return f"msg p {_g(args.get('p', 0.5))} on {_surrogate(args['base'], 'none', kind)}"
    if name == "dspike":
        return f"dspike b {_g(args.get('b', 3.0))} w {_g(args.get('width', 1.0))}" + \
            (" searched" if schedule == "auto" else "")
    if name == "adali":
        moving = f"{kind} to {_g(args.get('L_min', 0.3))}" if schedule == "auto" else "fixed"
        return f"adali {_g(args.get('L', 1.5))} {moving}"
    shown = {"triangle": "gamma", "atan": "alpha", "sigmoid": "alpha", "rectangle": "width"}[name]
    return f"{name} {shown} {_g(args[shown])}"


def _augmentation(cfg: Config) -> str:
    d = cfg.data
    if not d.augment:
        return "none"
    base = {"cifar10-dvs": "flip+roll", "imagenet": "rrc+flip"}.get(d.name, "crop+flip")
    return " + ".join([base] + (["AA"] if d.autoaugment else []) + ([f"cutout {d.cutout}"] if d.cutout else []))


def recipe_cells(cfg: Config) -> dict[str, str]:
    """The recipe table's cells (all but ``config`` and ``sources``) for one config."""
    n, o = cfg.neuron, cfg.optim
    neuron = n.type + (f" tau {n.tau:.4g}" if n.type in ("lif", "plif") else "") + \
        (" decay_input" if n.decay_input and n.type != "if" else "") + (" soft" if n.v_reset is None else " hard")
    model = cfg.model.name + ("" if cfg.model.stem == "auto" else f" stem {cfg.model.stem}") + \
        ("" if cfg.model.width == 1 else f" width {_g(cfg.model.width)}")
    data = cfg.data.name + ("" if cfg.data.size is None else f" {cfg.data.size}px {cfg.data.frames}")
    return {
        "model": model, "data": data,
        "optimiser": f"sgd m {_g(o.momentum)}" if o.name == "sgd" else o.name,
        "lr": _g(o.lr), "wd": _g(o.weight_decay), "schedule": o.schedule,
        "epochs": str(cfg.epochs), "batch": str(cfg.batch_size), "T": str(cfg.model.T),
        "neuron": neuron, "threshold": _g(n.v_threshold),
        "surrogate": _surrogate(cfg.surrogate, cfg.surrogate_schedule.name, cfg.surrogate_schedule.kind),
        "augmentation": _augmentation(cfg),
        "expected": "—" if cfg.expected_accuracy is None else _g(cfg.expected_accuracy),
    }


def table_rows() -> dict[str, dict[str, str]]:
    """docs/reproduce.md's recipe table: config path -> cells."""
    rows = {}
    for line in REPRODUCE.read_text().splitlines():
        if not line.startswith("| `configs/"):
            continue
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        assert len(cells) == len(COLUMNS), f"recipe row has {len(cells)} cells, expected {len(COLUMNS)}: {line}"
        row = dict(zip(COLUMNS, cells))
        path = row["config"].strip("`")
        assert path not in rows, f"{path} has two rows in the recipe table"
        rows[path] = row
    return rows


def test_the_recipe_table_has_one_row_per_config():
    assert set(table_rows()) == {str(p.relative_to(REPO)) for p in CONFIGS}


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: str(p.relative_to(REPO / "configs")))
def test_config_agrees_with_its_recipe_row(path):
    row = table_rows()[str(path.relative_to(REPO))]
    want = recipe_cells(load_config(path))
    got = {k: row[k] for k in want}
    assert got == want
    assert row["sources"] and row["sources"] != "—"


def _documents() -> list[Path]:
    return [REPO / "README.md", *sorted((REPO / "docs").rglob("*.md"))]


def test_every_config_path_named_in_readme_and_docs_exists():
    named = {}
    for doc in _documents():
        for match in re.finditer(r"configs/[\w./-]+?\.yaml", doc.read_text()):
            named.setdefault(match.group(0), doc.name)
    assert named, "no config path found in README.md or docs/"
    missing = {p: doc for p, doc in named.items() if not (REPO / p).is_file()}
    assert not missing, f"config paths that do not exist: {missing}"


def test_cifarnet_has_the_msg_authors_layers():
    model = create_model("cifarnet", 100, T=1)
    convs = [(n, tuple(p.shape)) for n, p in model.named_parameters() if n.endswith("conv.weight")]
    assert [s for _, s in convs] == [(256, 3, 3, 3), (256, 256, 3, 3), (256, 256, 3, 3), (256, 256, 3, 3),
                                     (512, 256, 3, 3), (512, 512, 3, 3), (1024, 512, 3, 3),
                                     (1024, 1024, 3, 3)]
    assert tuple(model.head.fc.weight.shape) == (100, 1024)
    assert model.all_stages == ["stage1", "stage2", "stage3", "stage4"] and model.stages == model.all_stages[:3]
    small = create_model("cifarnet", 10, T=2, width=0.125)
    small.eval()
    with torch.no_grad():
        logits, stages = small(torch.randn(3, 3, 32, 32), return_stages=True)
    shapes = [tuple(s.shape) for s in stages]
    assert shapes == [(2, 3, 32, 32, 32), (2, 3, 32, 16, 16), (2, 3, 64, 8, 8)]
    assert tuple(logits.shape) == (2, 3, 10)


def test_msg_neuron_as_written_by_the_authors_equals_its_rescaled_form():
    """LIF V <- V + (I - V)/2 firing at 0.5 with triangle gamma 0.5 (the MSG configs) gives the
    same spikes and gradients as u <- u/2 + I firing at 1 with triangle gamma 1 (u = 2V)."""
    torch.manual_seed(0)
    x = torch.randn(1, 4, 3, 32, 32, dtype=torch.float64).expand(4, -1, -1, -1, -1).contiguous()
    outs, grads = [], []
    for neuron, gamma in (({"tau": 2.0, "v_threshold": 0.5, "decay_input": True}, 0.5),
                          ({"tau": 2.0, "v_threshold": 1.0, "decay_input": False}, 1.0)):
        torch.manual_seed(1)
        model = create_model("cifarnet", 10, T=4, width=0.0625, neuron={"type": "lif", **neuron, "backend": "torch"},
                             surrogate={"name": "triangle", "gamma": gamma}).double()
        inp = x.clone().requires_grad_(True)
        out = model(inp)
        out.square().sum().backward()
        outs.append(out.detach())
        grads.append([p.grad.clone() for p in model.parameters()] + [inp.grad.clone()])
    assert torch.equal(outs[0], outs[1]) and outs[0].abs().sum() > 0
    assert all(g.abs().sum() > 0 for g in grads[0][:2])  # the first conv learns: gradients reach it
    for a, b in zip(*grads):
        assert torch.allclose(a, b, rtol=1e-9, atol=1e-12)

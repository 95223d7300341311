"""NIR export and import: bit-exact round trips, the parameter mapping against NIR's own
equations, refusals, snnTorch in both directions, and the docs' worked example."""
import re
from pathlib import Path

import nir
import numpy as np
import pytest
import snntorch as snn
import torch
from snntorch.export_nir import export_to_nir
from snntorch.import_nir import import_from_nir
from torch import Tensor, nn

import spikegrad.nir as sgnir
from spikegrad.layers import neuron_layers
from spikegrad.models import create_model
from spikegrad.nir import NIRNet, export_nir, fold_bn, from_nir, to_nir

T = 4
DOCS = Path(__file__).resolve().parents[1] / "docs" / "nir.md"
# name -> (registry name, input channels, input size, options)
MODELS = {
    "plain-8": ("plain-8", 1, 28, {}),
    "resnet20": ("resnet20", 3, 32, {}),
    "resnet20-sew": ("resnet20", 3, 32, {"sew": True}),
    "vgg11": ("vgg11", 3, 32, {}),
}
NEURONS = [
    {"type": "lif"},
    {"type": "lif", "decay_input": True},
    {"type": "lif", "tau": 4 / 3},                                   # the shortcut paper's k = 0.25
    {"type": "lif", "tau": 2.1, "v_threshold": 0.7, "v_reset": -0.2},   # 2.1, 1.1: float32 tau inexact
    {"type": "lif", "tau": 1.1, "decay_input": True, "v_reset": 0.1},
    {"type": "plif", "tau": 2.5},
    {"type": "if"},
]


def make(key: str, width: float = 0.25, bn_gain: float = 1.0, **kw) -> nn.Module:
    """A registry model in eval mode whose batch norms are far from identity: random
    affine parameters (times ``bn_gain``), then two training-mode passes to move the
    running statistics."""
    name, channels, size, options = MODELS[key]
    torch.manual_seed(0)
    model = create_model(name, T=T, in_channels=channels, width=width, **options, **kw)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            nn.init.uniform_(m.weight, 0.8 * bn_gain, 1.6 * bn_gain)
            nn.init.uniform_(m.bias, 0.0, 0.6 * bn_gain)
    model.train()
    with torch.no_grad():
        for _ in range(2):
            model(torch.randn(4, channels, size, size))
    return model.eval()


def image(key: str, batch: int = 2, dtype: torch.dtype = torch.float32) -> Tensor:
    """A random static input ``[B, C, H, W]`` for ``MODELS[key]``."""
    _, channels, size, _ = MODELS[key]
    return torch.randn(batch, channels, size, size, generator=torch.Generator().manual_seed(1), dtype=dtype)


@torch.no_grad()
def run(model: nn.Module, layers: dict[str, nn.Module], x: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
    """``(model(x), {name: output of layers[name]})``."""
    seen: dict[str, Tensor] = {}
    hooks = [m.register_forward_hook(lambda _m, _i, out, n=n: seen.__setitem__(n, out)) for n, m in layers.items()]
    try:
        return model(x), seen
    finally:
        for h in hooks:
            h.remove()


def neurons(model: nn.Module) -> dict[str, nn.Module]:
    return dict(neuron_layers(model))


def assert_same_spikes(got: dict[str, Tensor], want: dict[str, Tensor]) -> None:
    """Every layer's spikes bitwise equal, and every layer fires (so the check means something)."""
    assert got.keys() == want.keys()
    for name in want:
        assert torch.equal(got[name], want[name]), name
        assert want[name].sum() > 0, f"{name} never fires"


def nir_euler(node: nir.NIRNode, current: Tensor, dt: float) -> Tensor:
    """Spikes of a NIR ``LIF``/``IF`` node simulated from its own (float32) arrays by forward
    Euler with step ``dt``: ``current [T, ...]`` -> ``[T, ...]``; v starts at v_reset."""
    p = {k: torch.as_tensor(np.asarray(getattr(node, k)), dtype=current.dtype)
         for k in ("tau", "r", "v_leak", "v_threshold", "v_reset") if hasattr(node, k)}
    v, spikes = p["v_reset"].expand_as(current[0]), []
    for i in current:
        v = v + dt * p["r"] * i if isinstance(node, nir.IF) else v + dt / p["tau"] * (p["v_leak"] - v + p["r"] * i)
        s = v >= p["v_threshold"]
        v = torch.where(s, p["v_reset"], v)
        spikes.append(s.to(current.dtype))
    return torch.stack(spikes)


# ------------------------------------------------------------------ round trips
@pytest.mark.parametrize("key", MODELS)
def test_round_trip_is_bit_identical_to_the_folded_model(key, tmp_path):
    model = make(key)
    net = from_nir(export_nir(model, tmp_path / "model.nir"))
    folded, x = fold_bn(model), image(key)
    want_logits, want = run(folded, neurons(folded), x)
    got_logits, got = run(net, {name: net.nodes[name] for name in want}, x)
    assert isinstance(net, NIRNet) and net.T == T and not net.training
    assert got_logits.shape == (T, 2, 10)
    assert torch.equal(got_logits, want_logits)
    assert_same_spikes(got, want)
    assert torch.equal(net(model.encoder(x)), got_logits)            # a [T, B, ...] sequence too


@pytest.mark.parametrize("key", MODELS)
def test_fold_bn_matches_the_unfolded_model(key):
    model = make(key).double()
    folded = fold_bn(model)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in folded.modules())
    assert any(isinstance(m, nn.BatchNorm2d) for m in model.modules())   # the original is untouched
    assert not any(k.endswith("running_mean") for k in folded.state_dict())
    x = image(key, dtype=torch.float64)
    want_logits, want = run(model, neurons(model), x)
    got_logits, got = run(folded, neurons(folded), x)
    assert_same_spikes(got, want)
    torch.testing.assert_close(got_logits, want_logits, rtol=0, atol=1e-10)
    conv = folded.stem[0].conv if key.startswith("resnet") else folded.stage1.conv1.conv
    assert conv.bias is not None and conv.bias.abs().sum() > 0


def test_fold_bn_refuses_what_it_cannot_fold():
    lonely = nn.Sequential(nn.ReLU(), nn.BatchNorm2d(4))
    with pytest.raises(ValueError, match=r"batch norm layer '1'.*directly follow"):
        fold_bn(lonely)
    stateless = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4, track_running_stats=False))
    with pytest.raises(ValueError, match=r"'1': it keeps no running statistics"):
        fold_bn(stateless)


@pytest.mark.parametrize("dt", [1.0, 1e-4])
@pytest.mark.parametrize("neuron", NEURONS, ids=lambda n: "-".join(f"{k}={v:.3g}" if isinstance(v, float) else str(v)
                                                                for k, v in n.items()))
def test_neuron_mapping_is_exact(neuron, dt, tmp_path):
    bn_gain = neuron.get("tau", 2.0) if neuron.get("decay_input") else 1.0   # decay_input scales x by 1/tau
    model = make("plain-8", width=0.125, bn_gain=bn_gain, neuron=neuron)
    folded, x = fold_bn(model), image("plain-8")
    graph = to_nir(model, dt)
    # the written parameters, run through NIR's own equations, spike as our neuron does
    current = folded.stage1.conv1(folded.encoder(x))
    node = graph.nodes["stage1.sn1"]
    assert isinstance(node, nir.IF if neuron["type"] == "if" else nir.LIF)
    with torch.no_grad():
        assert torch.equal(nir_euler(node, current, dt), folded.stage1.sn1(current))
    # and the file round trip is bit-exact
    net = from_nir(export_nir(model, tmp_path / "model.nir", dt))
    with torch.no_grad():                                  # membranes too, not only spikes
        assert torch.equal(net.nodes["stage1.sn1"](current, return_state=True)[1],
                           folded.stage1.sn1(current, return_state=True)[1])
    want_logits, want = run(folded, neurons(folded), x)
    got_logits, got = run(net, {name: net.nodes[name] for name in want}, x)
    assert torch.equal(got_logits, want_logits)
    assert_same_spikes(got, want)


def test_parameter_mapping_values():
    tau, dt = 4 / 3, 1e-3
    for decay_input, r in ((False, tau), (True, 1.0)):
        model = make("plain-8", width=0.125, neuron={"tau": tau, "decay_input": decay_input, "v_reset": 0.25})
        node = to_nir(model, dt).nodes["stage2.sn1"]
        exact = node.metadata["float64"]
        assert exact == {"tau": tau * dt, "r": r, "v_leak": 0.25, "v_threshold": 1.0, "v_reset": 0.25}
        assert node.tau.dtype == np.float32 and node.tau.shape == node.r.shape == (16, 14, 14)
        assert np.all(node.tau == np.float32(tau * dt)) and np.all(node.r == np.float32(r))
    node = to_nir(make("plain-8", width=0.125, neuron={"type": "if"}), dt).nodes["stage1.sn1"]
    assert isinstance(node, nir.IF) and node.metadata["float64"]["r"] == 1 / dt


# ------------------------------------------------------------------ the file
def test_file_states_dt_encoding_edges_and_zero_biases(tmp_path):
    model = create_model("resnet20", T=3, in_channels=1, width=0.25, norm="none")
    model.stem[0].conv.bias = model.head.fc.bias = None
    graph = nir.read(export_nir(model, tmp_path / "model.nir", dt=1e-3))
    meta = graph.metadata
    assert float(meta["dt"]) == 1e-3 and int(meta["time_steps"]) == 3 and meta["encoding"] == "direct"
    assert "static image is repeated" in meta["input"] and "mean over the T steps" in meta["output"]
    assert np.array_equal(graph.nodes["stem.conv1.conv"].bias, np.zeros(4, np.float32))
    assert all(node.bias.shape == (node.weight.shape[0],) for node in graph.nodes.values()
               if isinstance(node, nir.Conv2d))
    inputs = {dst: sorted(src for src, d in graph.edges if d == dst) for _, dst in graph.edges}
    assert inputs["layer1.0.sn2"] == ["layer1.0.conv2.conv", "stem.sn1"]                    # identity shortcut
    assert inputs["layer2.0.sn2"] == ["layer2.0.conv2.conv", "layer2.0.downsample.conv"]    # projection
    assert list(graph.nodes["head.pool"].kernel_size) == [7, 7]
    assert isinstance(graph.nodes["head.flatten"], nir.Flatten)
    assert np.array_equal(graph.nodes["head.fc"].bias, np.zeros(10, np.float32))
    net = from_nir(graph)
    x = torch.randn(2, 1, 28, 28)
    with torch.no_grad():
        assert torch.equal(net(x), model.eval()(x))


def test_soft_reset_is_refused_and_nothing_is_written(tmp_path):
    model = create_model("plain-8", T=T, in_channels=1, width=0.125, neuron={"v_reset": None})
    target = tmp_path / "model.nir"
    target.write_bytes(b"an earlier export")
    for path in (target, tmp_path / "new.nir"):
        with pytest.raises(ValueError, match=r"^layer 'stage1.sn1' uses a soft \(subtractive\) reset"):
            export_nir(model, path)
    assert target.read_bytes() == b"an earlier export"
    assert list(tmp_path.iterdir()) == [target]


@pytest.mark.parametrize("kw,layer", [({"stem": "imagenet"}, "'stem.pool.0' (MaxPool2d)"),
                                      ({"neuron": {"type": "relu"}}, "'stem.sn1' (ClampReLU)")])
def test_layers_nir_cannot_express_are_named(kw, layer, tmp_path):
    model = create_model("resnet20", T=T, in_channels=3, width=0.125, **kw)
    with pytest.raises(ValueError, match=re.escape(f"layer {layer} cannot be expressed in NIR")):
        export_nir(model, tmp_path / "model.nir")
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(ValueError, match="takes a SpikingNet"):
        to_nir(nn.Sequential(nn.Linear(2, 2)))


def test_a_failed_write_leaves_no_file(tmp_path, monkeypatch):
    def half_write(path, graph):
        Path(path).write_bytes(b"half a file")
        raise OSError("disk full")

    monkeypatch.setattr(sgnir.nir, "write", half_write)
    with pytest.raises(OSError, match="disk full"):
        export_nir(make("plain-8", width=0.125), tmp_path / "model.nir")
    assert list(tmp_path.iterdir()) == []


# ------------------------------------------------------------------ import of other graphs
def affine(n_out: int, n_in: int, seed: int) -> nir.Affine:
    g = torch.Generator().manual_seed(seed)
    return nir.Affine(weight=torch.randn(n_out, n_in, generator=g).numpy(), bias=torch.rand(n_out, generator=g).numpy())


def test_import_of_pooling_flatten_and_rescaled_neurons():
    dt = 0.5
    lif = nir.LIF(tau=np.full(3, 3 * dt), r=np.full(3, 2.0), v_leak=np.full(3, 0.3),
                  v_threshold=np.full(3, 1.0), v_reset=np.zeros(3))
    integrate = nir.IF(r=np.full(2, 0.5 / dt), v_threshold=np.full(2, 0.8), v_reset=np.zeros(2))
    nodes = {"input": nir.Input(np.array([2, 4, 4])),
             "pool": nir.SumPool2d(np.array([2, 2]), np.array([2, 2]), np.array([0, 0])),
             "flat": nir.Flatten({"input": np.array([2, 2, 2])}, start_dim=0, end_dim=-1),
             "fc": nir.Linear(weight=affine(3, 8, 0).weight), "lif": lif,
             "fc2": affine(2, 3, 1), "if": integrate, "output": nir.Output(np.array([2]))}
    names = list(nodes)
    net = from_nir(nir.NIRGraph(nodes, list(zip(names, names[1:]))), dt=dt)
    x = torch.rand(6, 5, 2, 4, 4, generator=torch.Generator().manual_seed(2)) * 2
    pooled = x.unflatten(-1, (2, 2)).unflatten(-3, (2, 2)).sum(dim=(-3, -1)).flatten(2)   # [T, B, 8]
    hidden = nir_euler(lif, pooled @ torch.as_tensor(nodes["fc"].weight).T, dt)
    fc2 = nodes["fc2"]
    want = nir_euler(integrate, hidden @ torch.as_tensor(fc2.weight).T + torch.as_tensor(fc2.bias), dt)
    with torch.no_grad():
        got = net(x)
    assert want.sum() > 0 and hidden.sum() > 0
    torch.testing.assert_close(got, want)
    with pytest.raises(ValueError, match=r"input must be \[T, B, 2, 4, 4\], got shape \(5, 2, 4, 4\)"):
        net(x[0])                                                        # no time_steps in metadata


def test_import_refuses_unknown_nodes_cycles_and_missing_dt(tmp_path):
    lif = nir.LIF(tau=np.full(4, 2.0), r=np.full(4, 2.0), v_leak=np.zeros(4),
                  v_threshold=np.ones(4), v_reset=np.zeros(4))
    unknown = nir.NIRGraph({"input": nir.Input(np.array([4])), "gate": nir.Threshold(threshold=np.ones(4)),
                            "output": nir.Output(np.array([4]))}, [("input", "gate"), ("gate", "output")])
    with pytest.raises(ValueError, match=r"^NIR node 'gate' has type Threshold, which spikegrad cannot import"):
        from_nir(unknown, dt=1.0)
    cycle = nir.NIRGraph({"input": nir.Input(np.array([4])), "lif": lif, "rec": affine(4, 4, 0),
                          "output": nir.Output(np.array([4]))},
                         [("input", "lif"), ("lif", "rec"), ("rec", "lif"), ("lif", "output")], type_check=False)
    with pytest.raises(ValueError, match="recurrent edges"):
        from_nir(cycle, dt=1.0)
    plain = nir.NIRGraph.from_list(nir.Input(np.array([4])), lif, nir.Output(np.array([4])))
    with pytest.raises(ValueError, match="states no dt"):
        from_nir(plain)
    with pytest.raises(ValueError, match="does not exist"):
        from_nir(tmp_path / "missing.nir")
    (tmp_path / "junk.nir").write_bytes(b"not hdf5")
    with pytest.raises(ValueError, match="is not a readable NIR file"):
        from_nir(tmp_path / "junk.nir")


# ------------------------------------------------------------------ snnTorch
def test_snntorch_imports_our_file_with_the_same_spikes(tmp_path):
    """snnTorch assumes dt = 1e-4, v_leak = 0, reset to zero: export LIF (tau 2, hard reset
    to 0) with dt=1e-4. Its Flatten takes NIR's batch-free dims as torch dims, so batch 1."""
    model = make("plain-8", width=0.125)
    path = export_nir(model, tmp_path / "model.nir", dt=1e-4)
    snn_net = import_from_nir(nir.read(path))
    leaky = {name.replace("_", ".", 1): m for name, m in snn_net.named_modules() if isinstance(m, snn.Leaky)}
    folded = fold_bn(model)
    assert leaky.keys() == neurons(folded).keys()
    for x in image("plain-8", batch=2).split(1):
        for m in leaky.values():
            m.reset_mem()
        want_logits, want = run(folded, neurons(folded), x)
        got = {name: [] for name in leaky}
        hooks = [m.register_forward_hook(lambda _m, _i, out, n=n: got[n].append(out)) for n, m in leaky.items()]
        with torch.no_grad():
            logits = torch.stack([snn_net(x)[0] for _ in range(T)])
        for h in hooks:
            h.remove()
        assert_same_spikes({n: torch.stack(s) for n, s in got.items()}, want)
        torch.testing.assert_close(logits, want_logits[:, 0], rtol=1e-5, atol=1e-5)


def snntorch_mlp(alpha: float) -> nn.Sequential:
    """Linear -> Leaky -> Linear -> Synaptic -> Linear -> Leaky, hard reset to zero, per-neuron parameters."""
    torch.manual_seed(0)

    def full(n: int, value: float) -> Tensor:
        return torch.full((n,), value)

    opts = {"init_hidden": True, "reset_mechanism": "zero", "reset_delay": False}
    net = nn.Sequential(
        nn.Linear(20, 30), snn.Leaky(beta=full(30, 0.5), threshold=torch.ones(30), **opts),
        nn.Linear(30, 30), snn.Synaptic(alpha=full(30, alpha), beta=full(30, 0.75), threshold=torch.ones(30), **opts),
        nn.Linear(30, 5), snn.Leaky(beta=full(5, 0.5), threshold=torch.ones(5), **opts))
    for layer in net[::2]:
        nn.init.normal_(layer.weight, 0.2, 0.4)                  # strong enough that every layer fires
    return net


def test_snntorch_graph_imports_into_spikegrad():
    net = snntorch_mlp(alpha=0.0)
    graph = export_to_nir(net, torch.randn(1, 20), ignore_dims=[0])
    ours = from_nir(graph, dt=1e-4)                               # snnTorch writes no dt; it assumes 1e-4
    assert isinstance(graph.nodes["3"], nir.CubaLIF)
    x = 2 * torch.rand(T, 3, 20, generator=torch.Generator().manual_seed(0))
    layers = {"1": net[1], "3": net[3], "5": net[5]}
    want = {name: [] for name in layers}
    hooks = [m.register_forward_hook(lambda _m, _i, out, n=n: want[n].append(out)) for n, m in layers.items()]
    with torch.no_grad():
        for x_t in x:
            net(x_t)
    for h in hooks:
        h.remove()
    _, got = run(ours, {name: ours.nodes[name] for name in layers}, x)
    assert_same_spikes(got, {n: torch.stack(s) for n, s in want.items()})
    slow_synapse = export_to_nir(snntorch_mlp(alpha=0.5), torch.randn(1, 20), ignore_dims=[0])
    with pytest.raises(ValueError, match=r"NIR node '3' is a CubaLIF with tau_syn = 0.0002 != dt = 0.0001"):
        from_nir(slow_synapse, dt=1e-4)


# ------------------------------------------------------------------ the docs
def docs_example() -> list[str]:
    """The python blocks of docs/nir.md's "Worked example" section, in order."""
    section = DOCS.read_text().split("## Worked example", 1)[1]
    return re.findall(r"```python\n(.*?)```", section, flags=re.S)


def test_trained_model_keeps_its_accuracy_through_nir(tmp_path, monkeypatch):
    """Runs the docs' worked example: a plain-8 trained 50 steps on Fashion-MNIST,
    exported, imported from the file alone, and also read by snnTorch."""
    monkeypatch.chdir(tmp_path)
    blocks = docs_example()
    assert len(blocks) == 2
    ns: dict = {}
    for block in blocks:
        exec(compile(block, str(DOCS), "exec"), ns)
    assert ns["before"] > 20, "the example should learn something (chance is 10%)"
    assert ns["after"] == ns["before"]
    assert ns["snn_prediction"] == ns["our_prediction"]

"""NIR export and import: bit-exact round trips, the parameter mapping against NIR's own
equations, refusals, users' own networks, the default file read by snnTorch's and
SpikingJelly's importers, snnTorch in both directions, and the docs' worked example."""
import contextlib
import io
import re
import warnings
from pathlib import Path

import nir
import numpy as np
import pytest
import snntorch as snn
import torch
from snntorch.export_nir import export_to_nir
from snntorch.import_nir import import_from_nir
from spikingjelly.activation_based.nir_exchange import import_from_nir as sj_import_from_nir
from torch import Tensor, nn

import spikegrad.nir as sgnir
from spikegrad import monitor
from spikegrad.layers import DirectEncoder, SeqToANN, neuron_layers
from spikegrad.models import create_model
from spikegrad.neuron import LIF
from spikegrad.nir import NIRDtWarning, NIRNet, export_nir, fold_bn, from_nir, to_nir

OTHER_DT = pytest.mark.filterwarnings("ignore::spikegrad.nir.NIRDtWarning")   # tests of dt != 1e-4
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
    # against the unfolded model: the fold's float rounding may flip a rare spike, no more
    unfolded_logits, unfolded = run(model, neurons(model), x)
    flips = sum(int((got[name] != unfolded[name]).sum()) for name in want)
    assert flips <= 1e-4 * sum(s.numel() for s in want.values())
    assert torch.equal(got_logits.mean(0).argmax(-1), unfolded_logits.mean(0).argmax(-1))


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


@OTHER_DT
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


@OTHER_DT
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
@OTHER_DT
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
    flatten = graph.nodes["head.flatten"]                   # negative dims: right with or without a batch dim
    assert isinstance(flatten, nir.Flatten) and (flatten.start_dim, flatten.end_dim) == (-3, -1)
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
    with pytest.raises(ValueError, match=re.escape(f"layer {layer} is not expressible in NIR; supported: Conv2d")):
        export_nir(model, tmp_path / "model.nir")
    assert list(tmp_path.iterdir()) == []


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
def snntorch_run(snn_net: nn.Module, x: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
    """snnTorch's way: the net called once per step on the same static image (direct
    encoding), membranes reset first; per-step logits and each ``Leaky``'s spikes
    (keyed by our layer names: nirtorch writes dots as underscores)."""
    leaky = {name: m for name, m in snn_net.named_modules() if isinstance(m, snn.Leaky)}
    for m in leaky.values():
        m.reset_mem()
    got: dict[str, list[Tensor]] = {name: [] for name in leaky}
    hooks = [m.register_forward_hook(lambda _m, _i, out, n=n: got[n].append(out)) for n, m in leaky.items()]
    try:
        with torch.no_grad():
            logits = torch.stack([snn_net(x)[0] for _ in range(T)])
    finally:
        for h in hooks:
            h.remove()
    return logits, {name: torch.stack(spikes) for name, spikes in got.items()}


@pytest.mark.parametrize("key", ["plain-8", "resnet20"])
def test_snntorch_reads_the_default_file_as_our_model(key, tmp_path):
    """The default export (no dt) through snnTorch 1.0's importer, which assumes dt = 1e-4,
    v_leak = 0, reset to zero and a bias on Conv2d, on a batch of 4: the same predictions,
    and the same spikes except where float rounding (its convolutions on [B, ...], ours on
    [T*B, ...]) puts a membrane on the other side of the threshold."""
    model = make(key, width=0.125)
    snn_net = import_from_nir(nir.read(export_nir(model, tmp_path / "model.nir")))
    folded, x = fold_bn(model), image(key, batch=4)
    want_logits, want = run(folded, neurons(folded), x)
    logits, got = snntorch_run(snn_net, x)
    assert sorted(got) == sorted(name.replace(".", "_") for name in want)
    flips = sum(int((got[name.replace(".", "_")] != spikes).sum()) for name, spikes in want.items())
    assert all(spikes.sum() > 0 for spikes in want.values())
    assert flips <= 1e-4 * sum(spikes.numel() for spikes in want.values()), flips
    assert torch.equal(logits.mean(0).argmax(-1), want_logits.mean(0).argmax(-1))
    torch.testing.assert_close(logits, want_logits, rtol=1e-4, atol=1e-4)


@OTHER_DT
def test_snntorch_misreads_another_dt_and_the_export_warns(tmp_path):
    """What the warning is about: at dt = 1 snnTorch's importer still assumes 1e-4, so
    beta = 1 - 1e-4/tau is almost 1 and the threshold is scaled by 1e-4: another network."""
    model = make("plain-8", width=0.125)
    with pytest.warns(NIRDtWarning, match=r"dt=1: snnTorch's importer assumes dt=1e-4 and will silently misread"):
        path = export_nir(model, tmp_path / "model.nir", dt=1.0)
    assert from_nir(path).dt == 1.0                                        # ours reads dt from the file
    x = image("plain-8", batch=4)
    with contextlib.redirect_stdout(io.StringIO()):                       # its weight-scaling prints
        _, got = snntorch_run(import_from_nir(nir.read(path)), x)
    folded = fold_bn(model)
    _, want = run(folded, neurons(folded), x)
    assert not torch.equal(got["stage1_sn1"], want["stage1.sn1"])
    with pytest.raises(ValueError, match="must equal 1 or tau / dt"):     # SpikingJelly refuses it loudly
        sj_import_from_nir(str(path))


def test_default_export_does_not_warn(tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        export_nir(make("plain-8", width=0.125), tmp_path / "model.nir")
        to_nir(user_net(), input_shape=(1, 28, 28))
    with pytest.raises(ValueError, match="dt must be a positive number, got 0"):
        to_nir(make("plain-8", width=0.125), 0)


# ------------------------------------------------------------------ SpikingJelly
@pytest.mark.parametrize("key", ["plain-8", "resnet20-sew", "vgg11"])
def test_spikingjelly_reads_the_default_file_as_our_model(key, tmp_path):
    """SpikingJelly 2.0's importer (default dt = 1e-4; r = 1 or tau/dt, v_leak = v_reset)
    in multi-step mode on [T, B, ...]: logits equal to the folded model's."""
    model = make(key, width=0.125)
    sj_net = sj_import_from_nir(str(export_nir(model, tmp_path / "model.nir")), step_mode="m")
    x = image(key, batch=3)
    with torch.no_grad():
        logits, _state = sj_net(model.encoder(x).contiguous())
        want = fold_bn(model)(x)
    assert logits.shape == (T, 3, 10)
    torch.testing.assert_close(logits, want, rtol=1e-5, atol=1e-5)
    assert torch.equal(logits.mean(0).argmax(-1), want.mean(0).argmax(-1))


# ------------------------------------------------------------------ a user's own network
def user_net(encoder: bool = True) -> nn.Sequential:
    """A network a user builds from spikegrad layers: encoder, SeqToANN(conv, BN), LIF,
    pooling, flatten, linear; batch norms moved off identity by two training passes."""
    torch.manual_seed(0)
    net = nn.Sequential(*[DirectEncoder(T)] * encoder,
                        SeqToANN(nn.Conv2d(1, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)),
                        LIF(tau=2.0),
                        SeqToANN(nn.AvgPool2d(2), nn.Conv2d(8, 16, 3, padding=1), nn.BatchNorm2d(16)),
                        LIF(tau=2.0, decay_input=True, v_threshold=0.5),
                        SeqToANN(nn.AdaptiveAvgPool2d(2), nn.Flatten()),
                        nn.Dropout(0.2),
                        nn.Linear(64, 10))
    for m in net.modules():
        if isinstance(m, nn.BatchNorm2d):
            nn.init.uniform_(m.weight, 0.8, 1.6)
            nn.init.uniform_(m.bias, 0.0, 0.6)
    net.train()
    with torch.no_grad():
        for _ in range(2):
            x = torch.randn(4, 1, 28, 28)
            net(x if encoder else x.expand(T, *x.shape))
    return net.eval()


def test_a_users_own_network_exports_and_round_trips(tmp_path):
    net = user_net()
    path = export_nir(net, tmp_path / "mine.nir", input_shape=(1, 28, 28))
    graph = nir.read(path)
    assert [n for n in graph.nodes if n not in ("input", "output")] == ["1.0", "2", "3.0", "3.1", "4", "5.0", "5.1", "7"]
    assert graph.metadata["model"] == "Sequential" and int(graph.metadata["time_steps"]) == T
    assert graph.metadata["encoding"] == "direct"
    loaded = from_nir(path)
    x = image("plain-8", batch=3)
    folded = fold_bn(net)
    want_logits, want = run(folded, neurons(folded), x)
    got_logits, got = run(loaded, {name: loaded.nodes[name] for name in want}, x)
    assert_same_spikes(got, want)
    # AdaptiveAvgPool2d is written as the AvgPool2d of the same windows: another summation order
    torch.testing.assert_close(got_logits, want_logits, rtol=0, atol=1e-6)
    logits, _ = snntorch_run(import_from_nir(graph), x)                    # and snnTorch reads it too
    assert torch.equal(logits.mean(0).argmax(-1), want_logits.mean(0).argmax(-1))
    torch.testing.assert_close(logits, want_logits, rtol=1e-4, atol=1e-4)


def test_a_users_network_without_encoder_takes_sequences(tmp_path):
    net = user_net(encoder=False)
    loaded = from_nir(export_nir(net, tmp_path / "mine.nir", input_shape=[1, 28, 28]))
    assert loaded.T is None and "time_steps" not in loaded.metadata
    seq = image("plain-8", batch=2).expand(T, 2, 1, 28, 28)
    with torch.no_grad():
        torch.testing.assert_close(loaded(seq), fold_bn(net)(seq), rtol=0, atol=1e-6)


class _OwnForward(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = SeqToANN(nn.Conv2d(1, 4, 3))
        self.sn = LIF()

    def forward(self, x: Tensor) -> Tensor:
        return self.sn(self.conv(x))


@pytest.mark.parametrize("net,kw,message", [
    (nn.Sequential(DirectEncoder(T), _OwnForward()), {"input_shape": (1, 8, 8)},
     r"^layer '1' \(_OwnForward\) is a module with its own forward\(\), which to_nir cannot follow; build"),
    (nn.Sequential(DirectEncoder(T), SeqToANN(nn.Flatten(0)), nn.Linear(64, 2), LIF()), {"input_shape": (1, 8, 8)},
     r"^layer '1.0' \(Flatten\) flattens dims 0..-1 of \[T\*B, ...\] \(inside SeqToANN\), which reaches the time"),
    (nn.Sequential(SeqToANN(nn.MaxPool2d(2)), LIF()), {"input_shape": (1, 8, 8)},
     r"^layer '0.0' \(MaxPool2d\) is not expressible in NIR; supported: Conv2d"),
    (nn.Sequential(nn.Linear(4, 2), LIF(), DirectEncoder(T)), {"input_shape": (4,)},
     r"^layer '2' \(DirectEncoder\) is an encoder after other layers"),
    (nn.Sequential(nn.Linear(4, 2)), {"input_shape": (4,)}, r"has no spiking neuron"),
    (nn.Sequential(nn.Linear(4, 2), LIF()), {}, r"^to_nir needs input_shape= for a Sequential"),
    (nn.Sequential(nn.Linear(4, 2), LIF()), {"input_shape": 4}, r"^input_shape must be the per-step shape"),
    ("not a module", {}, r"takes a spiking network \(an nn.Module\), got str"),
])
def test_a_users_network_nir_cannot_express_is_named(net, kw, message, tmp_path):
    with pytest.raises(ValueError, match=message):
        export_nir(net, tmp_path / "mine.nir", **kw)
    assert list(tmp_path.iterdir()) == []


def test_nirnet_names_layers_as_the_exported_model(tmp_path):
    """eval and the monitors see NIRNet's modules; layer_name gives back the model's names."""
    model = make("plain-8", width=0.125, neuron={"tau": 2.0, "decay_input": True, "v_reset": 0.1})
    net = from_nir(export_nir(model, tmp_path / "model.nir"))
    with monitor.FiringRates(net) as rates, torch.no_grad():
        net(image("plain-8"))
    names = [net.layer_name(name) for name in rates.rates()]
    assert names == [name for name, _ in neuron_layers(model)]
    assert net.layer_name("layers.head_fc") == "head.fc" and net.layer_name("encoder") == "encoder"


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
    assert ns["agree"] == 100

"""Layers, encoders, neurons and the model registry: shapes, stages, options and errors."""
import json

import pytest
import torch
from torch import nn

from spikegrad import surrogate as sg
from spikegrad.layers import (ClampReLU, DirectEncoder, Head, PoissonEncoder, SeqToANN, flatten_time,
                              make_neuron, neuron_config, neuron_layers, unflatten_time)
from spikegrad.models import create_model, list_models
from spikegrad.models.plain import split_depth
from spikegrad.neuron import IF, LIF, PLIF, BaseNeuron

T, B, K, WIDTH = 2, 2, 5, 0.125
FIXED = ["resnet18", "resnet19", "resnet20", "resnet34", "vgg11", "vgg16", "vggsnn"]
STAGES = {
    "resnet18": ["layer1", "layer2", "layer3"], "resnet34": ["layer1", "layer2", "layer3"],
    "resnet19": ["layer1", "layer2"], "resnet20": ["layer1", "layer2"],
    "vgg11": ["stage1", "stage2", "stage3", "stage4"], "vgg16": ["stage1", "stage2", "stage3", "stage4"],
    "vggsnn": ["stage1", "stage2", "stage3"], "plain-8": ["stage1", "stage2"],
    "plain-40": ["stage1", "stage2"],
}


def small(name, **kw):
    return create_model(name, num_classes=K, T=T, width=WIDTH, **kw)


def test_list_models_has_every_name():
    names = list_models()
    assert set(FIXED) <= set(names)
    assert [n for n in names if n.startswith("plain-")] == [f"plain-{n}" for n in range(8, 41)]


@pytest.mark.parametrize("name", list(STAGES))
@pytest.mark.parametrize("channels,size", [(1, 28), (3, 32)])
def test_models_run_with_spiking_stage_outputs(name, channels, size):
    torch.manual_seed(0)
    model = small(name, in_channels=channels)
    x = torch.rand(B, channels, size, size)
    logits, stages = model(x, return_stages=True)
    assert logits.shape == (T, B, K)
    assert model.stages == STAGES[name] == model.all_stages[:-1]
    assert len(stages) == len(model.stages)
    for stage, out in zip(model.stages, stages):
        assert out.shape[:3] == (T, B, model.stage_channels[stage])
        assert set(out.unique().tolist()) <= {0.0, 1.0}
    logits.mean(0).logsumexp(1).sum().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


@pytest.mark.parametrize("name,stem,size,sides", [
    ("resnet18", "cifar", 32, [32, 16, 8]),
    ("resnet18", "imagenet", 64, [16, 8, 4]),
    ("resnet20", "cifar", 32, [32, 16]),
    ("vgg11", None, 28, [28, 14, 7, 3]),
    ("plain-16", None, 32, [32, 16]),
])
def test_stage_spatial_sizes(name, stem, size, sides):
    model = small(name, **({"stem": stem} if stem else {}))
    _, stages = model(torch.rand(B, 3, size, size), return_stages=True)
    assert [s.shape[-1] for s in stages] == [s.shape[-2] for s in stages] == sides


def test_vgg_pooling_is_skipped_at_1x1():
    model = small("vgg16")
    x = torch.rand(B, 3, 28, 28)  # 28 -> 14 -> 7 -> 3 -> 1: the last pooling meets a 1x1 map
    hits = []
    model.stage5.register_forward_hook(lambda m, i, o: hits.append(o.shape[-2:]))
    assert model(x).shape == (T, B, K)
    assert hits == [(1, 1)]


def test_widths_and_channel_counts():
    model = create_model("resnet18", width=0.25)
    assert model.stage_channels == {"layer1": 16, "layer2": 32, "layer3": 64, "layer4": 128}
    assert create_model("resnet20", width=0.01).stage_channels == {"layer1": 1, "layer2": 1, "layer3": 1}
    r19 = small("resnet19")
    assert r19.head.hidden.fc.out_features == 32 and r19.head.fc.in_features == 32


@pytest.mark.parametrize("depth,split", [(8, [3, 3, 2]), (16, [6, 5, 5]), (40, [14, 13, 13])])
def test_plain_depth_split(depth, split):
    assert split_depth(depth) == split
    model = small(f"plain-{depth}")
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert len(convs) == depth
    assert [sum(isinstance(m, nn.Conv2d) for m in model.get_submodule(s).modules())
            for s in model.all_stages] == split
    assert [c.stride[0] for c in convs].count(2) == 2


def test_norm_none_has_no_batchnorm_biased_convs_and_keeps_firing():
    torch.manual_seed(0)
    model = small("plain-40", norm="none")
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
    assert all(m.bias is not None for m in model.modules() if isinstance(m, nn.Conv2d))
    rates = []
    for _, neuron in neuron_layers(model):
        neuron.register_forward_hook(lambda m, i, o: rates.append(o.mean().item()))
    model(torch.rand(4, 3, 32, 32))
    assert len(rates) == 40 and min(rates) > 0.02  # the 40th layer still fires at init
    with_bn = small("plain-8")
    assert all(m.bias is None for m in with_bn.modules() if isinstance(m, nn.Conv2d))


def test_sew_resnet_adds_spikes_after_the_neuron():
    torch.manual_seed(0)
    model = small("resnet18", sew=True)
    _, stages = model(torch.rand(B, 3, 32, 32), return_stages=True)
    assert stages[-1].max() > 1  # spikes + spikes
    assert isinstance(model.layer2[0].downsample.sn1, BaseNeuron)


def test_event_input_passes_through_and_is_checked():
    model = small("vggsnn", in_channels=2)
    events = (torch.rand(T, B, 2, 32, 32) < 0.2).float()
    assert model(events).shape == (T, B, K)
    with pytest.raises(ValueError, match="T=2"):
        model(events[:1])
    with pytest.raises(ValueError, match="2 input channels"):
        model(torch.rand(B, 3, 32, 32))
    with pytest.raises(ValueError, match=r"\[B, C, H, W\]"):
        model(torch.rand(2, 32, 32))


def test_seq_to_ann_matches_a_loop_over_time():
    conv = nn.Conv2d(3, 4, 3)
    x = torch.randn(3, 2, 3, 8, 8)
    expected = torch.stack([conv(x[t]) for t in range(3)])
    torch.testing.assert_close(SeqToANN(conv)(x), expected)
    assert torch.equal(unflatten_time(flatten_time(x), 3), x)
    assert list(SeqToANN(conv).state_dict()) == ["0.weight", "0.bias"]


def test_direct_encoder_repeats_without_copying():
    x = torch.rand(B, 3, 8, 8)
    out = DirectEncoder(4)(x)
    assert out.shape == (4, B, 3, 8, 8) and out.data_ptr() == x.data_ptr() and out.stride(0) == 0
    assert all(torch.equal(out[t], x) for t in range(4))
    events = torch.rand(4, B, 2, 8, 8)
    assert DirectEncoder(4)(events) is events and PoissonEncoder(4)(events) is events
    with pytest.raises(ValueError, match="T=3"):
        DirectEncoder(3)(events)
    with pytest.raises(ValueError, match="positive integer"):
        DirectEncoder(0)


def test_poisson_encoder_statistics():
    torch.manual_seed(0)
    p = torch.tensor([0.0, 0.25, 0.5, 0.9, 1.0]).repeat(200).view(1, 1, 1, -1)  # [B=1, C=1, H=1, W]
    spikes = PoissonEncoder(400)(p)
    assert spikes.shape == (400, 1, 1, 1, 1000)
    assert set(spikes.unique().tolist()) <= {0.0, 1.0}
    rate = spikes.mean(0).view(200, 5).mean(0)
    torch.testing.assert_close(rate, p.view(200, 5)[0], atol=0.01, rtol=0)
    assert rate[0] == 0 and rate[-1] == 1
    steps = spikes[:, 0, 0, 0, 2::5]  # p = 0.5: independent across steps
    assert abs((steps[1:] * steps[:-1]).mean().item() - 0.25) < 0.01
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        PoissonEncoder(2)(torch.randn(B, 3, 8, 8))
    assert small("resnet20", encoding="poisson")(torch.rand(B, 3, 28, 28)).shape == (T, B, K)


def test_make_neuron_types_and_options():
    sur = sg.ATan()
    assert type(make_neuron({"type": "lif", "tau": 4.0}, sur)) is LIF
    assert make_neuron({"type": "lif", "tau": 4.0}, sur).tau == 4.0
    assert type(make_neuron({"type": "if", "tau": 3.0}, sur)) is IF  # IF ignores tau
    plif = make_neuron({"type": "plif", "tau": 4.0}, sur)
    assert type(plif) is PLIF and abs(1 / torch.sigmoid(plif.w).item() - 4.0) < 1e-5
    assert abs(1 / torch.sigmoid(make_neuron({"type": "plif", "init_tau": 3.0}, sur).w).item() - 3.0) < 1e-5
    soft = make_neuron({"v_reset": None, "v_threshold": 0.5, "detach_reset": True}, sur)
    assert (soft.v_reset, soft.v_threshold, soft.detach_reset) == (None, 0.5, True)
    assert soft.surrogate is sur
    x = torch.linspace(-3, 3, 13).view(13, 1)
    assert torch.equal(make_neuron({"type": "relu"}, sur)(x), x.relu())
    assert torch.equal(make_neuron({"type": "clamp"}, sur)(x), x.clamp(0, 2))
    assert make_neuron({"type": "clamp", "clamp_max": 1.0}, sur)(x).max() == 1.0
    assert neuron_config({"type": "clamp"})["clamp_max"] == 2.0


@pytest.mark.parametrize("cfg,match", [
    ({"type": "izhikevich"}, "unknown neuron type 'izhikevich'.*clamp, if, lif, plif, relu"),
    ({"type": "lif", "leak": 0.5}, "unknown key.*leak.*expected any of type, tau"),
    ({"type": "lif", "clamp_max": 1.0}, "clamp_max"),
    ({"type": "lif", "tau": 0.5}, "tau"),
    ({"type": "clamp", "clamp_max": -1}, "clamp_max"),
    ("lif", "dict"),
])
def test_bad_neuron_configs_raise(cfg, match):
    with pytest.raises(ValueError, match=match):
        make_neuron(cfg, sg.ATan())


def test_one_surrogate_object_serves_every_neuron():
    dspike = sg.Dspike(b=3.0)
    model = small("resnet18", surrogate=dspike, neuron={"type": "plif"})
    neurons = neuron_layers(model)
    assert len(neurons) == 17 and all(isinstance(n, PLIF) for _, n in neurons)
    assert model.surrogate is dspike and all(n.surrogate is dspike for _, n in neurons)
    dspike.b = 5.0  # a schedule changing the surrogate changes every neuron
    assert all(n.surrogate.b == 5.0 for _, n in neurons)
    from_dict = small("vgg11", surrogate={"name": "sigmoid", "alpha": 3.0})
    assert isinstance(from_dict.surrogate, sg.Sigmoid) and from_dict.surrogate.alpha == 3.0
    assert all(n.surrogate is from_dict.surrogate for _, n in neuron_layers(from_dict))
    assert isinstance(small("vgg11").surrogate, sg.ATan) and small("vgg11").surrogate.alpha == 2.0


def test_ann_twin_has_the_same_keys_and_bounded_activations():
    twin = small("resnet18", neuron={"type": "clamp"})
    assert not any(isinstance(m, BaseNeuron) for m in twin.modules())
    assert list(twin.state_dict()) == list(small("resnet18").state_dict())
    _, stages = twin(torch.rand(B, 3, 32, 32), return_stages=True)
    assert all(s.min() >= 0 and s.max() <= 2 for s in stages)
    assert any(((s > 0) & (s < 1)).any() for s in stages)  # analog, not spikes


@pytest.mark.parametrize("kw,match", [
    ({"name": "resnet50"}, "unknown model 'resnet50'.*resnet18.*vggsnn.*plain-N"),
    ({"name": "plain-7"}, "plain-N with N in 8..40"),
    ({"name": "plain-41"}, "plain-N"),
    ({"name": "plain-x"}, "plain-N"),
    ({"name": "resnet18", "depth": 3}, "unknown argument.*depth.*stem, sew"),
    ({"name": "vgg11", "stem": "imagenet"}, "unknown argument.*stem"),
    ({"name": "resnet18", "stem": "tiny"}, "stem must be one of cifar, imagenet"),
    ({"name": "resnet18", "sew": "yes"}, "sew"),
    ({"name": "vgg11", "encoding": "rate"}, "encoding must be one of direct, poisson"),
    ({"name": "vgg11", "norm": "ln"}, "norm must be one of bn, none"),
    ({"name": "vgg11", "width": 0}, "width"),
    ({"name": "vgg11", "T": 0}, "T must be a positive integer"),
    ({"name": "vgg11", "num_classes": 0}, "num_classes"),
    ({"name": "vgg11", "backend": "cuda"}, "backend must be one of"),
    ({"name": "vgg11", "backend": "eager", "neuron": {"backend": "fused"}}, "conflicts"),
    ({"name": "vgg11", "surrogate": {"alpha": 2.0}}, "surrogate must be"),
    ({"name": "vgg11", "surrogate": {"name": "atan", "beta": 1}}, "atan"),
    ({"name": "vgg11", "neuron": {"type": "lif", "foo": 1}}, "foo"),
])
def test_bad_names_and_arguments_raise(kw, match):
    with pytest.raises(ValueError, match=match):
        create_model(**kw)


def test_config_round_trips():
    model = create_model("resnet18", num_classes=7, T=3, in_channels=1, encoding="poisson",
                         neuron={"type": "plif", "v_reset": None}, norm="none", width=0.125,
                         surrogate=sg.MSG(sg.Dspike(b=2.0), p=0.3), stem="imagenet", sew=True)
    cfg = model.config
    assert json.loads(json.dumps(cfg)) == cfg  # plain data
    assert cfg["name"] == "resnet18" and cfg["stem"] == "imagenet" and cfg["sew"] is True
    assert cfg["surrogate"]["base"] == {"name": "dspike", "b": 2.0, "width": 1.0}
    rebuilt = create_model(**cfg)
    assert rebuilt.config == cfg
    assert {k: v.shape for k, v in rebuilt.state_dict().items()} == \
        {k: v.shape for k, v in model.state_dict().items()}
    assert rebuilt.T == 3 and isinstance(rebuilt.encoder, PoissonEncoder)
    defaults = small("plain-8").config
    assert defaults["neuron"] == {"type": "lif", "tau": 2.0, "v_threshold": 1.0, "v_reset": 0.0,
                                  "decay_input": False, "detach_reset": False, "backend": "auto"}
    assert defaults["surrogate"] == {"name": "atan", "alpha": 2.0}


def test_state_dict_is_plain_and_loads_into_a_rebuilt_model():
    torch.manual_seed(0)
    model = small("resnet20", surrogate={"name": "msg", "p": 0.5})
    keys = list(model.state_dict())
    assert not any("surrogate" in k or "encoder" in k for k in keys)
    assert keys == list(small("resnet20").state_dict())
    x = torch.rand(B, 3, 32, 32)
    model.eval()
    rebuilt = create_model(**model.config).eval()
    rebuilt.load_state_dict(model.state_dict())
    assert torch.equal(rebuilt(x), model(x))


def test_clamp_relu_is_elementwise_on_sequences():
    x = torch.randn(T, B, 3, 4, 4) * 3
    assert torch.equal(ClampReLU(1.5)(x), x.clamp(0, 1.5))
    assert torch.equal(ClampReLU()(x), x.relu())


def test_head_pools_as_mean_does_and_hands_back_a_broadcast_gradient():
    """The head's average pooling: mean's values and gradient, but the gradient reaches the
    spikes as a broadcast view instead of a new tensor laid out contiguous (which the neuron
    before it would copy back to its channels-last layout)."""
    torch.manual_seed(0)
    head = Head(6, 3)
    x = torch.rand(12, 6, 5, 5).contiguous(memory_format=torch.channels_last).unflatten(0, (2, 6))
    x.requires_grad_()
    out = head(x)
    assert torch.equal(out, head.fc(x.mean(dim=(-2, -1))))
    grad = torch.autograd.grad(out.sum(), x)[0]
    assert grad.stride()[-2:] == (0, 0)
    assert torch.equal(grad, torch.autograd.grad(head.fc(x.mean(dim=(-2, -1))).sum(), x)[0])

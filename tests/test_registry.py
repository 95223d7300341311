"""One registry type: a user's own surrogate, neuron, model, loss or method is accepted
everywhere a name is, without editing the package."""
import dataclasses

import pytest
import torch

from spikegrad import callbacks, layers, losses, methods, models
from spikegrad import surrogate as sg
from spikegrad.config import load_config
from spikegrad.registry import Registry


def test_register_get_names_and_refusals():
    reg = Registry("widget")
    reg.register("b", 2)

    @reg.register("a")
    def a():
        return 1

    assert reg.get("a") is a and reg.get("B") == 2 and reg.names() == ["a", "b"] and "a" in reg
    with pytest.raises(ValueError, match="widget 'a' is registered already"):
        reg.register("a", 3)
    reg.register("a", 3, replace=True)
    assert reg.get("a") == 3
    with pytest.raises(ValueError, match=r"unknown widget 'c'.*expected one of a, b"):
        reg.get("c")
    with pytest.raises(ValueError, match="did you mean 'b'"):
        reg.get("bb")
    with pytest.raises(ValueError, match="lowercase"):
        reg.register("Upper", 1)


def test_a_lazy_entry_is_imported_on_first_get():
    reg = Registry("thing")
    reg.register("ltl", "spikegrad.tandem:LTL")
    from spikegrad.tandem import LTL

    assert reg.get("ltl") is LTL


@pytest.fixture
def own_surrogate():
    class Fast(sg.Surrogate):
        """A fast sigmoid: g(x) = 1 / (2 (1 + |x|)^2)."""

        def grad(self, x):
            return 0.5 / (1 + x.abs()) ** 2

        def primitive(self, x):
            return 0.5 + 0.5 * x / (1 + x.abs())

        def config(self):
            return {"name": "fast-sigmoid"}

    sg.SURROGATES.register("fast-sigmoid", Fast)
    yield Fast
    del sg.SURROGATES._entries["fast-sigmoid"]


def test_a_users_surrogate_trains_through_config_model_and_neuron(own_surrogate):
    cfg = load_config(None, ["surrogate=fast-sigmoid"])
    assert cfg.surrogate == {"name": "fast-sigmoid"}
    model = models.create_model("plain-8", T=2, width=0.125, in_channels=1, surrogate="fast-sigmoid",
                                backend="torch")
    assert isinstance(model.surrogate, own_surrogate)
    x = torch.full((3,), 0.5, requires_grad=True)
    layers.make_neuron({"backend": "torch"}, sg.create("fast-sigmoid"))(x.view(3, 1)).sum().backward()
    # the last input reaches only the last spike: h = 0.875 there (LIF, tau 2), so x - v_th = -0.125
    assert x.grad[-1] == pytest.approx(0.5 / 1.125 ** 2)


def test_a_users_model_neuron_loss_and_method_pass_config_validation():
    def tiny(ctx):
        return models.MODELS.get("plain-8").builder(ctx)

    models.MODELS.register("tiny", models.ModelEntry(tiny, {}))
    layers.NEURONS.register("lif2", layers.NEURONS.get("lif"))
    losses.LOSSES.register("ce2", losses.RateCE)
    methods.METHODS.register("vanilla2", methods.Method)
    try:
        cfg = load_config(None, ["neuron.type=lif2", "loss=ce2", "method=vanilla2"])
        assert (cfg.neuron.type, cfg.loss.name, cfg.method.name) == ("lif2", "ce2", "vanilla2")
        model = models.create_model("tiny", T=2, width=0.125, in_channels=1, neuron={"type": "lif2"})
        assert "tiny" in models.list_models() and model.config["name"] == "tiny"
        assert isinstance(losses.from_config(cfg.loss, 2), losses.RateCE)
        assert type(methods.create(cfg.method, losses.RateCE())) is methods.Method
    finally:
        for reg, name in ((models.MODELS, "tiny"), (layers.NEURONS, "lif2"), (losses.LOSSES, "ce2"),
                          (methods.METHODS, "vanilla2")):
            del reg._entries[name]


def test_config_choices_come_from_the_registries():
    with pytest.raises(ValueError, match=r"'neuron.type' must be one of clamp, if, lif, plif, relu"):
        load_config(None, ["neuron.type=lfi"])
    with pytest.raises(ValueError, match=r"'method.name' must be one of ann, evolutionary, ltl, shortcut"):
        load_config(None, ["method=shortcuts"])
    with pytest.raises(ValueError, match=r"'data.name' must be one of .*fashion-mnist"):
        load_config(None, ["data.name=fmnist"])


def test_surrogates_are_taken_by_object_name_or_dict():
    assert isinstance(sg.resolve("atan"), sg.ATan) and sg.resolve({"name": "dspike", "b": 2}).b == 2
    kept = sg.Sigmoid(alpha=3)
    assert sg.resolve(kept) is kept and isinstance(sg.resolve(None), sg.ATan)
    with pytest.raises(ValueError, match="unknown surrogate 'atn'; did you mean 'atan'"):
        sg.resolve("atn")


def test_the_callbacks_a_run_gets_depend_on_its_surrogate_and_objective():
    class Run:  # what the factories read of a trainer
        def __init__(self, surrogate, loss="ce"):
            self.cfg = load_config(None, [f"surrogate={surrogate}", f"loss={loss}"])
            self.model = models.create_model("plain-8", T=2, width=0.125, in_channels=1,
                                             surrogate=self.cfg.surrogate, backend="torch")
            self.objective = losses.from_config(self.cfg.loss, 2)

    assert set(callbacks.create_all(Run("atan"))) == {"objective"}
    assert set(callbacks.create_all(Run("dspike"))) == {"dspike", "objective"}
    assert set(callbacks.create_all(Run("adali", "two"))) == {"adali", "objective"}
    assert set(callbacks.create_all(Run("msg"))) == {"msg", "objective"}
    off = Run("dspike")
    off.cfg = dataclasses.replace(off.cfg, surrogate_schedule=dataclasses.replace(
        off.cfg.surrogate_schedule, name="none"))
    assert set(callbacks.create_all(off)) == {"objective"}

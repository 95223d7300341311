"""monitor: gradient norms, firing rates and synaptic operations against manual counts."""
import gc
import weakref

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from spikegrad.monitor import (FiringRates, SynapticOps, energy, first_layer_grad_norm,
                               grad_norms, layer_names)
from spikegrad.neuron import LIF

T, B = 3, 4


class Flat(nn.Module):
    """Runs a stateless module on ``[T*B, ...]``: ``[T, B, ...] -> [T, B, ...]``."""

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.module = module

    def forward(self, x):
        return self.module(x.flatten(0, 1)).unflatten(0, x.shape[:2])


def tiny_net() -> nn.Sequential:
    """conv (analog input), LIF, conv stride 2, LIF, linear: ``[T, B, 1, 8, 8] -> [T, B, 5]``."""
    torch.manual_seed(0)
    return nn.Sequential(
        Flat(nn.Conv2d(1, 4, 3, padding=1)), LIF(v_threshold=0.3, backend="torch"),
        Flat(nn.Conv2d(4, 6, 3, stride=2, padding=1)), LIF(v_threshold=0.3, backend="torch"),
        Flat(nn.Flatten()), Flat(nn.Linear(6 * 4 * 4, 5)))


def inputs(batch: int = B) -> torch.Tensor:
    return torch.randn(T, batch, 1, 8, 8)


def no_hooks(model: nn.Module) -> bool:
    return all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())


def test_layer_names_are_weight_layers_shallow_to_deep():
    assert layer_names(tiny_net()) == ["0.module", "2.module", "5.module"]


def test_grad_norms_equal_manual_norms_and_skip_layers_without_grad():
    net = tiny_net()
    net[2].module.weight.requires_grad_(False)
    net(inputs()).sum().backward()
    norms = grad_norms(net)
    assert list(norms) == ["0.module", "5.module"]
    for name, value in norms.items():
        assert value == pytest.approx(float(net.get_submodule(name).weight.grad.norm()), rel=1e-6)
    assert first_layer_grad_norm(net) == pytest.approx(norms["0.module"], rel=1e-6)


def test_first_layer_grad_norm_is_none_before_backward():
    assert first_layer_grad_norm(tiny_net()) is None
    assert grad_norms(tiny_net()) == {}


def test_firing_rates_equal_manual_mean_over_batches_of_different_sizes():
    net = tiny_net()
    spikes = {1: [], 3: []}
    keep = [net[i].register_forward_hook(lambda m, a, out, i=i: spikes[i].append(out.detach()))
            for i in spikes]
    with FiringRates(net) as fr:
        for batch in (4, 1):
            net(inputs(batch))
    for handle in keep:
        handle.remove()
    rates = fr.rates()
    assert list(rates) == ["1", "3"]
    for i, outs in spikes.items():
        manual = torch.cat([s.flatten() for s in outs]).mean()
        assert rates[str(i)] == pytest.approx(float(manual), rel=1e-6)
        assert 0 < rates[str(i)] < 1
    assert fr.neurons() == {"1": 4 * 8 * 8, "3": 6 * 4 * 4}
    every_spike = torch.cat([s.flatten() for outs in spikes.values() for s in outs])
    assert fr.overall() == pytest.approx(float(every_spike.mean()), rel=1e-6)  # layers weighted by size
    assert fr.overall() != pytest.approx(sum(rates.values()) / 2, rel=1e-3)
    assert no_hooks(net)
    fr.reset()
    assert fr.rates() == {} and fr.neurons() == {} and fr.overall() is None


def test_firing_rates_keep_no_graph_alive_and_leave_outputs_unchanged():
    net = tiny_net()
    x = inputs().requires_grad_()
    ref = weakref.ref(x)
    expected = net(x).detach()
    fr = FiringRates(net)
    out = net(x)
    assert torch.equal(out, expected)
    del out, x
    gc.collect()
    assert ref() is None  # nothing kept the graph (which saves x) alive
    fr.remove()
    assert no_hooks(net)


def test_sops_of_linear_on_spikes_are_nonzero_inputs_times_out_features():
    torch.manual_seed(1)
    spikes = (torch.rand(6, 20) < 0.3).float()
    layer = nn.Linear(20, 7)
    with SynapticOps(layer) as ops:
        layer(spikes)
    summary = ops.summary()
    assert summary["samples"] == 6
    assert summary["sops"] * 6 == pytest.approx(int(spikes.count_nonzero()) * 7)
    assert summary["macs"] == 0
    assert summary["ann_macs"] == pytest.approx(20 * 7)
    assert no_hooks(layer)


@pytest.mark.parametrize("stride, padding, groups, mode", [
    (1, 1, 1, "zeros"), (2, 1, 2, "zeros"), (2, 0, 1, "zeros"), (1, 1, 2, "circular")])
def test_sops_of_conv_on_spikes_equal_all_ones_convolution(stride, padding, groups, mode):
    torch.manual_seed(2)
    spikes = (torch.rand(3, 4, 9, 9) < 0.2).float()
    conv = nn.Conv2d(4, 6, 3, stride=stride, padding=padding, groups=groups, padding_mode=mode)
    padded = F.pad(spikes, [padding] * 4, mode=mode) if mode != "zeros" else spikes
    reference = F.conv2d(padded, torch.ones(6, 4 // groups, 3, 3), stride=stride,
                         padding=0 if mode != "zeros" else padding, groups=groups).sum()
    with SynapticOps(conv) as ops:
        conv(spikes)
    assert ops.summary()["sops"] * 3 == pytest.approx(float(reference))


def test_analog_input_counts_as_dense_macs():
    conv = nn.Conv2d(2, 5, 3, stride=2, padding=1)
    with SynapticOps(conv) as ops:
        out = conv(torch.randn(2, 2, 8, 8))
    summary = ops.summary()
    assert summary["sops"] == 0
    assert summary["macs"] == pytest.approx(out[0].numel() * 2 * 9)
    assert summary["macs"] == pytest.approx(summary["ann_macs"])


def test_sops_of_a_spiking_net_per_sample_with_time_summed():
    net = tiny_net()
    x = inputs()
    expected = net(x)
    seen = {}
    keep = [net[i].module.register_forward_hook(
        lambda m, a, out, i=i: seen.update({i: (a[0].detach(), out.detach())})) for i in (0, 2, 5)]
    with SynapticOps(net) as ops:
        assert torch.equal(net(x), expected)
    for handle in keep:
        handle.remove()
    summary = ops.summary()
    assert (summary["samples"], summary["time_steps"]) == (B, T)
    first_in, first_out = seen[0]
    conv2_in, conv2_out = seen[2]
    fc_in, _ = seen[5]
    first_macs = first_out.numel() * 1 * 9
    conv2_sops = F.conv2d(conv2_in, torch.ones(6, 4, 3, 3), stride=2, padding=1).sum()
    fc_sops = fc_in.count_nonzero() * 5
    assert summary["macs"] * B == pytest.approx(first_macs)
    assert summary["per_layer"]["2.module"]["sops"] * B == pytest.approx(float(conv2_sops))
    assert summary["sops"] * B == pytest.approx(float(conv2_sops + fc_sops))
    dense = first_macs + conv2_out.numel() * 4 * 9 + fc_in.numel() * 5
    assert summary["ann_macs"] == pytest.approx(dense / (B * T))
    assert list(summary["per_layer"]) == ["0.module", "2.module", "5.module"]
    assert no_hooks(net)
    pj = energy(summary, e_ac=1.0, e_mac=5.0)
    assert pj["snn"] == pytest.approx(summary["sops"] + 5 * summary["macs"])
    assert pj["ratio"] == pytest.approx(pj["snn"] / (5 * summary["ann_macs"]))


def test_summary_before_any_forward_says_so():
    with pytest.raises(ValueError, match="no forward pass"):
        SynapticOps(nn.Linear(2, 2)).summary()

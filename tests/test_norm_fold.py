"""A batch norm folded into the fused neuron (``sn(x, norm=bn)``) against BN-then-neuron.

The ``eager`` and ``fused`` backends normalise inside their loop and never write the
normalised tensor; the reference backend applies the batch norm module first. In
float64 the spikes must be equal and every gradient (input, residual, BN weight and
bias, initial membrane, PLIF's decay), the running statistics and the batch count
within 1e-6 (the project's float64 parity tolerances).
"""
import copy

import pytest
import torch

from spikegrad import memory, neuron
from spikegrad.models import create_model


def _layer(kind: str, channels: int) -> tuple[torch.nn.Module, memory.BatchNorm2d]:
    torch.manual_seed(0)
    sn = neuron.PLIF(init_tau=3.0, decay_input=True) if kind == "plif" else neuron.LIF(tau=2.0)
    bn = memory.BatchNorm2d(channels).double()
    with torch.no_grad():
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.uniform_(-0.2, 0.4)
    return sn.double(), bn


def _run(backend, sn, bn, x, residual, v_init, steps=2):
    sn, bn = copy.deepcopy(sn), copy.deepcopy(bn)
    sn.backend = backend
    leaves = [t.clone().requires_grad_() if t is not None else None for t in (x, residual, v_init)]
    for _ in range(steps):  # two batches: the running statistics move twice
        spikes, v = sn(leaves[0], v_init=leaves[2], return_state=True, residual=leaves[1], norm=bn)
    weights = torch.linspace(-1, 1, spikes.numel(), dtype=x.dtype).view_as(spikes)
    ((spikes * weights).sum() + (v * v).sum()).backward()
    grads = [t.grad for t in leaves if t is not None]
    grads += [bn.weight.grad, bn.bias.grad] + [p.grad for p in sn.parameters()]
    return spikes.detach(), grads, [bn.running_mean, bn.running_var, bn.num_batches_tracked]


def _inputs(channels_last: bool, residual: bool, v_init: bool):
    gen = torch.Generator().manual_seed(1)
    T, B, C, H, W = 3, 4, 5, 6, 6
    x = torch.randn(T * B, C, H, W, generator=gen, dtype=torch.float64) * 2 + 0.5
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    x = x.unflatten(0, (T, B))
    r = torch.randn(x.shape, generator=gen, dtype=torch.float64) * 0.5 if residual else None
    v0 = torch.randn(x.shape[1:], generator=gen, dtype=torch.float64) * 0.3 if v_init else None
    return x, r, v0


def _assert_agree(ref, other):
    assert torch.equal(ref[0], other[0]), "spikes differ"
    for a, b in zip(ref[1] + ref[2], other[1] + other[2]):
        torch.testing.assert_close(b, a, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("kind, channels_last, residual, v_init", [
    ("lif", False, False, False), ("lif", True, True, False), ("lif", True, False, True),
    ("plif", False, True, True), ("plif", True, False, False)])
def test_eager_fold_matches_batch_norm_then_neuron(kind, channels_last, residual, v_init):
    sn, bn = _layer(kind, 5)
    x, r, v0 = _inputs(channels_last, residual, v_init)
    assert bn.folds(x)
    ref = _run("torch", sn, bn, x, r, v0)
    other = _run("eager", sn, bn, x, r, v0)
    _assert_agree(ref, other)
    assert other[0].flatten(0, 1).is_contiguous(memory_format=torch.channels_last) == channels_last


def test_compiled_fold_matches_batch_norm_then_neuron():
    sn, bn = _layer("lif", 5)
    x, r, v0 = _inputs(True, True, False)
    _assert_agree(_run("torch", sn, bn, x, r, v0), _run("fused", sn, bn, x, r, v0))


@pytest.mark.parametrize("backend", ["eager", "fused"])
def test_spikes_alone_match_spikes_with_state(backend):
    """Without ``return_state`` the final membrane is never computed and backward gets no
    gradient for it: the same spikes and input gradients as through a state left unused."""
    sn, bn = _layer("lif", 5)
    sn.backend = backend
    x, _, _ = _inputs(False, False, False)
    weights = torch.linspace(-1, 1, x.numel(), dtype=x.dtype).view_as(x)
    grads = []
    for state in (False, True):
        leaf = x.clone().requires_grad_()
        out = sn(leaf, return_state=state, norm=copy.deepcopy(bn))
        spikes = out[0] if state else out
        (spikes * weights).sum().backward()
        grads.append((spikes.detach(), leaf.grad))
    assert torch.equal(grads[0][0], grads[1][0])
    torch.testing.assert_close(grads[0][1], grads[1][1], rtol=1e-12, atol=1e-12)


def test_fold_keeps_the_conv_output_not_the_normalised_one():
    """Backward keeps the neuron's input before the norm and four per-channel vectors: one
    float tensor per layer, as BatchNorm2d + neuron (which share the normalised one)."""
    sn, bn = _layer("lif", 5)
    x, _, _ = _inputs(False, False, False)
    sn.backend = "eager"
    with memory.saved_tensors(compact=False) as record:
        spikes = sn(x.clone().requires_grad_(), norm=bn)
    assert spikes.grad_fn is not None
    per_channel = 4 * 5 * 8  # weight, bias, mean, rstd
    assert record.nbytes == x.numel() * 8 + per_channel


def test_no_fold_outside_batch_statistics():
    """Eval mode, a plain nn.BatchNorm2d and the triton-less torch backend apply the norm
    module first; the result is BN-then-neuron exactly."""
    sn, bn = _layer("lif", 5)
    x, _, _ = _inputs(False, False, False)
    bn.eval()
    assert not bn.folds(x)
    sn.backend = "eager"
    flat = x.flatten(0, 1)
    expected = sn(bn(flat).unflatten(0, x.shape[:2]))
    assert torch.equal(sn(x, norm=bn), expected)
    plain = torch.nn.BatchNorm2d(5).double().train()
    expected = sn(copy.deepcopy(plain)(flat).unflatten(0, x.shape[:2]))
    assert torch.equal(sn(x, norm=plain), expected)


@pytest.mark.parametrize("name", ["resnet18", "vgg11"])
def test_models_fold_on_eager_as_the_reference_computes(name, monkeypatch):
    """A whole model (ConvBN.fire hands every BN to its neuron) on ``eager`` against the
    reference backend, float64: same logits, gradients and running statistics."""
    torch.manual_seed(0)
    model = create_model(name, num_classes=10, T=2, width=0.125).double()
    x = torch.randn(3, 3, 32, 32, dtype=torch.float64)
    results, bn_calls = [], []
    for backend in ("torch", "eager"):
        monkeypatch.setenv("SPIKEGRAD_BACKEND", backend)
        net = copy.deepcopy(model)
        calls = []
        for m in net.modules():
            if isinstance(m, memory.BatchNorm2d):
                m.register_forward_hook(lambda *args: calls.append(1))
        out = net(x)
        bn_calls.append(len(calls))
        out.pow(2).mean().backward()
        results.append((out.detach(), [p.grad for p in net.parameters()],
                        [b for b in net.buffers() if b.dtype == torch.float64]))
    # folded batch norms do not run their own forward: only ResNet's downsampling ones
    # (no neuron after them) do
    assert bn_calls[1] == (3 if name == "resnet18" else 0) and bn_calls[0] > bn_calls[1]
    (out_ref, grads_ref, stats_ref), (out, grads, stats) = results
    torch.testing.assert_close(out, out_ref, rtol=1e-9, atol=1e-9)
    for a, b in zip(grads + stats, grads_ref + stats_ref):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-8)

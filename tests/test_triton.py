"""The Triton backend (kernels.triton_lif) against the reference, on CPU under Triton's interpreter."""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported: CPU tensors run interpreted

import pytest
import torch

from spikegrad import surrogate as sg
from spikegrad.neuron import LIF, PLIF, default_backend

pytest.importorskip("triton")

OPTIONS = [dict(), dict(v_reset=None), dict(v_reset=-0.3, decay_input=True), dict(detach_reset=True),
           dict(v_reset=None, detach_reset=True, decay_input=True)]


def _run(neuron, x, residual, v_init, upstream):
    spikes, v = neuron(x, v_init=v_init, residual=residual, return_state=True)
    inputs = [t for t in (x, residual, v_init) if t is not None]
    grads = torch.autograd.grad((spikes * upstream).sum() + v.sum(), inputs)
    return spikes, v, grads


@pytest.mark.parametrize("options", OPTIONS)
@pytest.mark.parametrize("surrogate", ["atan", "dspike", "triangle"])
@pytest.mark.parametrize("with_residual, with_v_init", [(False, False), (True, False), (True, True)])
def test_triton_matches_reference(options, surrogate, with_residual, with_v_init):
    torch.manual_seed(0)
    x = torch.randn(5, 3, 37, requires_grad=True)  # 111 neurons: a partial block too
    residual = (torch.rand(5, 3, 37) < 0.3).float().requires_grad_() if with_residual else None
    v_init = (0.3 * torch.randn(3, 37)).requires_grad_() if with_v_init else None
    upstream = torch.randn(5, 3, 37)
    results = [_run(LIF(tau=1.7, surrogate=sg.create(surrogate), backend=b, **options), x, residual, v_init, upstream)
               for b in ("torch", "triton")]
    (s_ref, v_ref, g_ref), (s_tri, v_tri, g_tri) = results
    assert torch.equal(s_ref, s_tri)
    torch.testing.assert_close(v_tri, v_ref, rtol=1e-6, atol=1e-6)
    for a, b in zip(g_tri, g_ref):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_triton_plif_decay_gradient_and_msg_mask():
    torch.manual_seed(1)
    x = torch.randn(4, 2, 64, requires_grad=True)
    grads = []
    for backend in ("eager", "triton"):
        neuron = PLIF(init_tau=3.0, surrogate=sg.create("msg", base={"name": "atan"}, p=0.5, seed=7),
                      backend=backend)
        spikes = neuron(x)
        grads.append(torch.autograd.grad(spikes.sum(), (x, neuron.w)))
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_triton_half_precision_inputs():
    torch.manual_seed(2)
    x = torch.randn(3, 4, 50).to(torch.bfloat16)
    spikes = LIF(backend="triton")(x)
    assert spikes.dtype == torch.bfloat16
    assert torch.equal(spikes.float(), LIF(backend="torch")(x.float()))


def test_auto_picks_triton_on_cuda_only(monkeypatch):
    monkeypatch.delenv("SPIKEGRAD_BACKEND", raising=False)
    assert default_backend("cuda") == "triton"
    assert default_backend("cpu") == "fused"
    monkeypatch.setenv("SPIKEGRAD_BACKEND", "eager")
    assert default_backend("cuda") == "eager"


def test_triton_on_cpu_without_interpreter_is_refused(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="needs CUDA tensors"):
        LIF(backend="triton")(torch.randn(2, 3))


def test_triton_with_a_folded_batch_norm():
    """``norm=`` on the Triton kernels (the normalised input written, its backward in torch)
    against the reference's batch norm then neuron: spikes, gradients, running statistics."""
    import copy

    from spikegrad import memory
    torch.manual_seed(3)
    x = torch.randn(3, 2, 4, 5, 5) * 2 + 0.5
    residual = (torch.rand_like(x) < 0.3).float()
    norm = memory.BatchNorm2d(4)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
        norm.bias.uniform_(-0.2, 0.4)
    results = []
    for backend in ("torch", "triton"):
        bn = copy.deepcopy(norm)
        leaves = [t.clone().requires_grad_() for t in (x, residual)]
        spikes = LIF(tau=1.7, backend=backend)(leaves[0], residual=leaves[1], norm=bn)
        (spikes * torch.linspace(-1, 1, spikes.numel()).view_as(spikes)).sum().backward()
        results.append([spikes, *(t.grad for t in leaves), bn.weight.grad, bn.bias.grad, bn.running_mean,
                        bn.running_var])
    assert torch.equal(results[0][0], results[1][0])
    for a, b in zip(results[0][1:], results[1][1:]):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5)

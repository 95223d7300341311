"""Neurons: every backend against the reference, gradcheck, and bad input.

Tolerances: float64 spikes bitwise equal, gradients within 1e-6;
float32 spikes equal except where |h - v_th| < 1e-5, gradients within 1e-4 relative.
"""
import math

import pytest
import torch
from hypothesis import given, settings, strategies as st

from spikegrad import neuron, surrogate as sg


def _run(backend, x, v0, surrogate, **opts):
    x = x.clone().requires_grad_()
    v0 = v0.clone().requires_grad_()
    spikes, v = neuron.lif_multistep(x, v0, surrogate=surrogate, backend=backend,
                                     return_state=True, **opts)
    weights = torch.linspace(-1, 1, spikes.numel(), dtype=x.dtype).view_as(spikes)
    ((spikes * weights).sum() + (v * v).sum()).backward()
    return spikes.detach(), v.detach(), x.grad, v0.grad


def _inputs(shape, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=gen, dtype=dtype) * 0.8 + 0.4
    v0 = torch.randn(shape[1:], generator=gen, dtype=dtype) * 0.3
    return x, v0


def _assert_agree(ref, other, dtype, v_threshold=1.0):
    tol = 1e-6 if dtype == torch.float64 else 1e-4
    for a, b in zip(ref, other):
        assert a.shape == b.shape
    assert torch.equal(ref[0], other[0]), "spikes differ"
    for a, b in zip(ref[1:], other[1:]):
        assert torch.allclose(a, b, rtol=tol, atol=tol), float((a - b).abs().max())


SURROGATES = {name: (lambda n=name: sg.create(n)) for name in sg.names()}
RESETS = [0.0, None, -0.3]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("detach_reset", [False, True])
@pytest.mark.parametrize("v_reset", RESETS)
@pytest.mark.parametrize("name", sg.names())
def test_eager_fused_matches_reference(name, v_reset, detach_reset, dtype):
    x, v0 = _inputs((5, 3, 7), dtype)
    opts = dict(tau=2.0, v_reset=v_reset, detach_reset=detach_reset, decay_input=name == "sigmoid")
    ref = _run("torch", x, v0, SURROGATES[name](), **opts)
    other = _run("eager", x, v0, SURROGATES[name](), **opts)  # MSG: same seed, same masks
    _assert_agree(ref, other, dtype)


@pytest.mark.parametrize("name, v_reset, detach_reset, dtype", [
    ("atan", 0.0, False, torch.float32),
    ("atan", None, True, torch.float32),
    ("sigmoid", 0.0, True, torch.float64),
    ("dspike", None, False, torch.float64),
    ("msg", 0.0, False, torch.float32),
    ("adali", -0.3, False, torch.float32),
])
def test_compiled_fused_matches_reference(name, v_reset, detach_reset, dtype):
    x, v0 = _inputs((4, 2, 3, 8), dtype)
    opts = dict(tau=2.0, v_reset=v_reset, detach_reset=detach_reset)
    ref = _run("torch", x, v0, SURROGATES[name](), **opts)
    other = _run("fused", x, v0, SURROGATES[name](), **opts)
    _assert_agree(ref, other, dtype)


@pytest.mark.parametrize("backend", ["eager", "fused"])
def test_channels_last_input_gives_the_same_values_in_its_layout(backend):
    """The kernels read ``[T, N]`` rows in the input's memory layout: a channels-last
    ``[T, B, C, H, W]`` input (a view of a ``[T*B, C, H, W]`` channels-last conv output)
    gives the reference's spikes and gradients, and spikes in that layout, without a copy
    of the input or a residual."""
    x, v0 = _inputs((3, 2, 4, 5, 6), torch.float64)
    cl = x.flatten(0, 1).contiguous(memory_format=torch.channels_last).unflatten(0, (3, 2))
    residual = torch.rand_like(x).round().flatten(0, 1).contiguous(memory_format=torch.channels_last)
    residual = residual.unflatten(0, (3, 2))
    assert not cl.is_contiguous() and torch.equal(cl, x)

    def run(backend, x, residual):
        # clone keeps the layout
        x, residual = x.detach().clone().requires_grad_(), residual.detach().clone().requires_grad_()
        lif = neuron.LIF(tau=2.0, backend=backend)
        spikes, v = lif(x, v0, residual=residual, return_state=True)
        weights = torch.linspace(-1, 1, spikes.numel(), dtype=x.dtype).view_as(spikes)
        ((spikes * weights).sum() + (v * v).sum()).backward()
        return spikes, v, x.grad, residual.grad

    ref = run("torch", x, residual)
    ours = run(backend, cl, residual)
    assert ours[0].stride() == cl.stride()  # spikes come back channels-last
    _assert_agree([t.detach().contiguous() for t in ref], [t.detach().contiguous() for t in ours],
                  torch.float64)


@settings(max_examples=40, deadline=None)
@given(T=st.integers(1, 6), batch=st.integers(1, 3), features=st.integers(1, 9),
       tau=st.floats(1.0, 8.0), v_threshold=st.floats(0.2, 2.0),
       v_reset=st.sampled_from(RESETS), decay_input=st.booleans(),
       detach_reset=st.booleans(), seed=st.integers(0, 10_000))
def test_backends_agree_property(T, batch, features, tau, v_threshold, v_reset,
                                 decay_input, detach_reset, seed):
    x, v0 = _inputs((T, batch, features), torch.float64, seed)
    opts = dict(tau=tau, v_threshold=v_threshold, v_reset=v_reset,
                decay_input=decay_input, detach_reset=detach_reset)
    _assert_agree(_run("torch", x, v0, sg.ATan(), **opts),
                  _run("eager", x, v0, sg.ATan(), **opts), torch.float64)


@pytest.mark.parametrize("backend", ["torch", "eager"])
@pytest.mark.parametrize("v_reset, detach_reset, decay_input",
                         [(0.0, False, False), (None, False, True), (0.2, True, True), (None, True, False)])
def test_gradcheck_smooth_dynamics(backend, v_reset, detach_reset, decay_input):
    """With the smooth primitive as forward, the hand-written backward is the exact derivative."""
    smooth = sg.Sigmoid(alpha=2.0, spiking=False)
    x, v0 = _inputs((4, 2, 3), torch.float64)

    def f(x, v0):
        return neuron.lif_multistep(x, v0, tau=1.7, v_reset=v_reset, detach_reset=detach_reset,
                                    decay_input=decay_input, surrogate=smooth, backend=backend,
                                    return_state=True)

    if detach_reset:  # detach_reset drops a true derivative on purpose: compare with autograd
        ref = torch.autograd.functional.jacobian(lambda a: f(a, v0)[0], x)
        ref_b = torch.autograd.functional.jacobian(
            lambda a: neuron.lif_multistep(a, v0, tau=1.7, v_reset=v_reset, detach_reset=True,
                                           decay_input=decay_input, surrogate=smooth,
                                           backend="torch"), x)
        assert torch.allclose(ref, ref_b, atol=1e-10)
        return
    assert torch.autograd.gradcheck(f, (x.requires_grad_(), v0.requires_grad_()))


@pytest.mark.parametrize("backend", ["torch", "eager"])
@pytest.mark.parametrize("decay_input", [False, True])
def test_plif_tau_gradient(backend, decay_input):
    torch.manual_seed(0)
    x, _ = _inputs((4, 3, 5), torch.float64)
    cell = neuron.PLIF(init_tau=3.0, decay_input=decay_input, backend=backend,
                       surrogate=sg.ATan(spiking=False)).double()
    cell(x).sum().backward()
    analytic = cell.w.grad.clone()
    eps = 1e-6
    with torch.no_grad():
        cell.w += eps
        up = cell(x).sum()
        cell.w -= 2 * eps
        down = cell(x).sum()
    assert float(analytic) == pytest.approx(float((up - down) / (2 * eps)), rel=1e-5)


def test_plif_backends_agree_and_learn_tau():
    x, _ = _inputs((4, 3, 5), torch.float32)
    grads = []
    for backend in ("torch", "eager"):
        cell = neuron.PLIF(backend=backend)
        cell(x).mul(torch.arange(5.0)).sum().backward()
        grads.append(cell.w.grad)
    assert torch.allclose(grads[0], grads[1], rtol=1e-4, atol=1e-6)
    assert float(grads[0]) != 0.0
    assert 1.0 / float(torch.sigmoid(neuron.PLIF(init_tau=2.0).w)) == pytest.approx(2.0)


def test_if_has_no_leak_and_integrates():
    x = torch.full((5, 1), 0.3)
    spikes = neuron.IF(backend="torch")(x)
    assert spikes.flatten().tolist() == [0, 0, 0, 1, 0]  # 0.3 * 4 = 1.2 crosses at t=3
    assert torch.equal(neuron.lif_multistep(x, tau=math.inf, backend="torch"), spikes)


def test_neuron_keeps_no_state_between_calls():
    cell = neuron.LIF(backend="eager")
    x, _ = _inputs((4, 2, 6), torch.float32)
    assert torch.equal(cell(x), cell(x))
    spikes, v = cell(x, return_state=True)
    assert v.shape == x.shape[1:]
    # running in two halves with the state carried equals one run
    first, v_mid = cell(x[:2], return_state=True)
    second = cell(x[2:], v_init=v_mid)
    assert torch.equal(torch.cat([first, second]), spikes)


def test_soft_reset_subtracts_threshold():
    x = torch.tensor([[1.5], [0.0], [0.0]])
    spikes, v = neuron.lif_multistep(x, tau=math.inf, v_reset=None, backend="torch",
                                     return_state=True)
    assert spikes.flatten().tolist() == [1, 0, 0] and float(v) == pytest.approx(0.5)


@pytest.mark.parametrize("call, match", [
    (lambda: neuron.lif_multistep(torch.zeros(5)), "leading time dimension"),
    (lambda: neuron.lif_multistep(torch.zeros(3, 2), tau=0.5), "tau must be"),
    (lambda: neuron.lif_multistep(torch.zeros(3, 2), v_threshold=0.0), "v_threshold must be"),
    (lambda: neuron.LIF(tau=0.9), "tau must be"),
    (lambda: neuron.LIF(v_threshold=-1.0), "v_threshold must be"),
    (lambda: neuron.PLIF(init_tau=1.0), "init_tau must be"),
    (lambda: neuron.LIF(backend="cuda"), "backend must be one of"),
    (lambda: neuron.LIF()(torch.zeros(3)), "leading time dimension"),
    (lambda: neuron.LIF()(torch.zeros(3, 2, 4), v_init=torch.zeros(4)), "v_init must have shape"),
])
def test_bad_input_raises_one_clear_error(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_surrogate_by_name_or_dict_and_single_steps_with_explicit_state():
    torch.manual_seed(0)
    by_name = neuron.LIF(surrogate="sigmoid", backend="torch")
    by_dict = neuron.LIF(surrogate={"name": "sigmoid", "alpha": 4.0}, backend="torch")
    assert type(by_name.surrogate).__name__ == type(by_dict.surrogate).__name__ == "Sigmoid"
    x = torch.rand(5, 3, 4, dtype=torch.float64) * 1.5
    whole, v_final = by_name(x, return_state=True)
    v, steps = None, []
    for t in range(5):  # snnTorch's habit: spk, mem = lif(x[t], mem)
        s, v = by_name.step(x[t], v)
        steps.append(s)
    assert torch.equal(torch.stack(steps), whole) and torch.allclose(v, v_final)
    with pytest.raises(ValueError, match=r"neuron.step\(x, v\)"):
        by_name(torch.rand(4))

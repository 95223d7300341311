"""Surrogates: forward is Θ, backward is grad(x), grad is the primitive's derivative."""
import math

import pytest
import torch

from spikegrad import surrogate as sg

SMOOTH = ["rectangle", "triangle", "sigmoid", "atan", "dspike", "adali"]


def _points() -> torch.Tensor:
    # avoid the kinks of the piecewise surrogates, where finite differences straddle a corner
    x = torch.linspace(-2.0, 2.0, 401, dtype=torch.float64)
    corners = torch.tensor([0.0, 0.5, 1.0, 1.5], dtype=torch.float64)
    return x[((x.abs()[:, None] - corners).abs() > 1e-3).all(dim=1)]


@pytest.mark.parametrize("name", sg.names())
def test_forward_is_heaviside_and_backward_is_grad(name):
    s = sg.create(name)
    x = torch.randn(1000, dtype=torch.float64, requires_grad=True)
    out = s(x)
    assert torch.equal(out, (x >= 0).double())
    if name == "msg":  # masked: the kept entries carry grad(x), the rest zero
        out.backward(torch.ones_like(x))
        kept = x.grad != 0
        assert torch.allclose(x.grad[kept], s.grad(x.detach())[kept])
        return
    upstream = torch.randn_like(x)
    out.backward(upstream)
    assert torch.allclose(x.grad, upstream * s.grad(x.detach()))


@pytest.mark.parametrize("name", SMOOTH)
def test_grad_is_derivative_of_primitive(name):
    s = sg.create(name)
    x, eps = _points(), 1e-6
    numeric = (s.primitive(x + eps) - s.primitive(x - eps)) / (2 * eps)
    assert torch.allclose(s.grad(x), numeric, atol=1e-6)


@pytest.mark.parametrize("name", SMOOTH)
def test_grad_integrates_to_one(name):
    s = sg.create(name)
    x = torch.linspace(-60, 60, 1_200_001, dtype=torch.float64)
    area = torch.trapezoid(s.grad(x), x)
    tail = 0.02 if name == "atan" else 1e-3  # atan's tails decay like 1/x^2
    assert abs(float(area) - 1.0) < tail


def test_primitive_limits():
    for name in SMOOTH:
        s = sg.create(name)
        lo, hi = s.primitive(torch.tensor([-50.0])), s.primitive(torch.tensor([50.0]))
        assert float(lo) == pytest.approx(0.0, abs=0.01) and float(hi) == pytest.approx(1.0, abs=0.01)


def test_dspike_temperature_limits():
    x = torch.linspace(-0.45, 0.45, 91, dtype=torch.float64)
    flat = sg.Dspike(b=1e-4).grad(x)  # b -> 0: clipped straight-through estimator (1/width)
    assert torch.allclose(flat, torch.ones_like(x), atol=1e-6)
    sharp = sg.Dspike(b=40.0).grad(x)  # b -> inf: mass concentrates at 0
    assert sharp[45] > 15 and sharp[0] < 1e-6
    d = sg.Dspike(b=3.0)
    d.b = 5.0  # schedulable attribute
    assert d.grad(torch.zeros(1)).item() == pytest.approx(5 / (2 * math.tanh(2.5)))


def test_msg_mask_fraction_within_three_sigma():
    p, n = 0.3, 200_000
    msg = sg.MSG(sg.Rectangle(width=4.0), p=p, seed=1)
    x = torch.zeros(n, requires_grad=True)
    msg(x).sum().backward()
    masked = float((x.grad == 0).double().mean())
    assert abs(masked - p) < 3 * math.sqrt(p * (1 - p) / n)


def test_msg_is_deterministic_under_seed_and_restorable():
    def grads(msg):
        x = torch.zeros(1000, requires_grad=True)
        msg(x).sum().backward()
        return x.grad

    a, b = sg.MSG(p=0.5, seed=7), sg.MSG(p=0.5, seed=7)
    assert torch.equal(grads(a), grads(b))
    state = a.get_rng_state()
    first = grads(a)
    a.set_rng_state(state)
    assert torch.equal(grads(a), first)
    assert not torch.equal(grads(sg.MSG(p=0.5, seed=8)), grads(sg.MSG(p=0.5, seed=7)))


def test_msg_rescale_keeps_expected_gradient():
    msg = sg.MSG(sg.Rectangle(width=4.0), p=0.5, rescale=True, seed=3)
    x = torch.zeros(100_000, requires_grad=True)
    msg(x).sum().backward()
    assert float(x.grad.mean()) == pytest.approx(0.25, rel=0.02)


def test_msg_from_config_dict():
    msg = sg.create("msg", p=0.25, base={"name": "sigmoid", "alpha": 3.0})
    assert isinstance(msg.base, sg.Sigmoid) and msg.base.alpha == 3.0
    assert sg.create(**msg.config()).config() == msg.config()


def test_adali_calibration_recovers_known_parameters():
    gen = torch.Generator().manual_seed(0)
    L0, R0, n_below, n_above = 0.8, 0.5, 30_000, 70_000
    below = -torch.rand(n_below, generator=gen, dtype=torch.float64) * 2 * L0  # median distance L0
    above = torch.rand(n_above, generator=gen, dtype=torch.float64) * 2 * R0
    ada = sg.AdaLi().calibrate(torch.cat([below, above]))
    assert ada.L == pytest.approx(L0, rel=0.02) and ada.R == pytest.approx(R0, rel=0.02)
    assert ada.alpha == pytest.approx(0.3, abs=0.01) and ada.alpha + ada.beta == pytest.approx(1.0)
    assert (ada.L_max, ada.R_max) == (ada.L, ada.R)


def test_adali_asymmetric_mass():
    ada = sg.AdaLi(alpha=0.2, L=1.0, R=0.5)
    x = torch.linspace(-1.5, 1.5, 300_001, dtype=torch.float64)
    g = ada.grad(x)
    assert float(torch.trapezoid(g * (x < 0), x)) == pytest.approx(0.2, abs=1e-3)
    assert float(torch.trapezoid(g * (x >= 0), x)) == pytest.approx(0.8, abs=1e-3)


@pytest.mark.parametrize("call, match", [
    (lambda: sg.create("tanh"), "unknown surrogate 'tanh'"),
    (lambda: sg.Rectangle(width=0), "width must be a positive number"),
    (lambda: sg.Triangle(gamma=-1), "gamma must be a positive number"),
    (lambda: sg.Dspike(width=0.0), "width must be a positive number"),
    (lambda: sg.MSG(p=1.0), r"p must be in \[0, 1\)"),
    (lambda: sg.MSG(p=-0.1), r"p must be in \[0, 1\)"),
    (lambda: sg.create("atan", beta=2), "surrogate 'atan'"),
    (lambda: sg.AdaLi(alpha=0.7, beta=0.7), "sum to 1"),
])
def test_bad_arguments_raise_one_clear_error(call, match):
    with pytest.raises(ValueError, match=match):
        call()

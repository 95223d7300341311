"""Training callbacks: AdaLi calibrates on training-mode potentials and leaves the model as
it was; each callback's state goes through ``state_dict`` and comes back."""
import pytest
import torch

from spikegrad import callbacks, models
from spikegrad import surrogate as sg
from spikegrad.schedules import AdaLiSchedule, DspikeTemperature


def _model(surrogate):
    torch.manual_seed(0)
    return models.create_model("plain-8", T=2, width=0.25, in_channels=1, surrogate=surrogate,
                               backend="torch")


def test_calibration_sees_batch_normalised_potentials_and_restores_the_buffers():
    model = _model("adali")
    x = 5 + 3 * torch.randn(16, 1, 28, 28)  # far from the normalised scale
    before = {k: v.clone() for k, v in model.state_dict().items()}
    potentials = callbacks.training_potentials(model.eval(), x)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # running stats and counts untouched
    assert not model.training  # mode restored
    # training mode normalises every conv output by its batch statistics: the potentials
    # (input at t = 0, minus the threshold 1) have mean about -1 and std about 1 per layer,
    # unlike the un-normalised outputs fresh running statistics would let through in eval
    assert potentials.mean() == pytest.approx(-1.0, abs=0.05)
    assert potentials.std() == pytest.approx(1.0, abs=0.1)


def test_adali_training_calibrates_once_then_follows_its_schedule():
    model = _model({"name": "adali"})
    surrogate = callbacks.surrogates_of(model, sg.AdaLi)[0]

    class Run:
        batch = 0
        cfg = type("C", (), {"epochs": 3})()

        def __init__(self):
            self.model = model

        def fixed_batch(self):
            return torch.randn(8, 1, 28, 28), torch.zeros(8, dtype=torch.long)

    cb = callbacks.AdaLiTraining([surrogate], AdaLiSchedule("linear"), calibrate=True)
    logged = cb.start_epoch(Run(), 0)
    L_max, R_max = surrogate.L_max, surrogate.R_max
    assert (L_max, R_max) != (1.5, 1.5)  # calibrated to the potentials
    assert logged["adali_L"] == pytest.approx(L_max)
    cb.start_epoch(Run(), 2)
    assert surrogate.L_max == L_max  # no second calibration
    assert cb.start_epoch(Run(), 2)["adali_L"] == pytest.approx(surrogate.L_min)
    state = cb.state_dict()
    fresh = _model({"name": "adali"})
    other = callbacks.AdaLiTraining(callbacks.surrogates_of(fresh, sg.AdaLi), AdaLiSchedule("linear"), True)
    other.load_state_dict(state)
    restored = other.surrogates[0]
    assert (restored.alpha, restored.beta, restored.L_max, restored.R_max) == \
        (surrogate.alpha, surrogate.beta, surrogate.L_max, surrogate.R_max)


def test_msg_and_dspike_state_round_trips():
    model = _model({"name": "msg", "p": 0.5})
    msg = callbacks.surrogates_of(model, sg.MSG)[0]
    masks = callbacks.MSGMasks([msg])
    msg.mask(torch.zeros(10))  # the generator exists and has moved
    state = masks.state_dict()
    first = msg.mask(torch.zeros(1000))
    masks.load_state_dict(state)
    assert torch.equal(msg.mask(torch.zeros(1000)), first)
    search = callbacks.DspikeSearch([], DspikeTemperature(2.6, 0.2, 1e-3, 4))
    other = callbacks.DspikeSearch([], DspikeTemperature(3.0, 0.2, 1e-3, 4))
    other.load_state_dict(search.state_dict())
    assert other.search.b == 2.6


class _Toy(torch.autograd.Function):
    """Forward ``a . w`` (its true gradient is ``a`` whatever b); backward reports
    ``sign * (a + (b - b_best) c)``: the surrogate gradient of temperature ``b``."""

    @staticmethod
    def forward(ctx, w, knobs):
        ctx.knobs = knobs
        return (knobs["a"] * w).sum() * knobs["scale"]

    @staticmethod
    def backward(ctx, grad):
        k = ctx.knobs
        return grad * k["sign"] * (k["a"] + (k["surrogate"].b - k["b_best"]) * k["c"]), None


def _toy_search(b_best=3.2, sign=1.0, scale=1.0):
    torch.manual_seed(0)
    weight = torch.nn.Parameter(torch.randn(50))
    surrogate = sg.Dspike(b=3.0)
    knobs = {"a": torch.randn(50), "c": torch.randn(50), "b_best": b_best, "sign": sign, "scale": scale,
             "surrogate": surrogate}
    search = DspikeTemperature(3.0, 0.2, 1e-3, 16)
    chosen = search.step(torch.nn.Module(), weight, [surrogate], lambda: _Toy.apply(weight, knobs), epoch=1)
    return chosen, search, surrogate


def test_dspike_search_moves_to_the_candidate_that_matches_the_true_gradient():
    chosen, search, surrogate = _toy_search(b_best=3.2)
    assert chosen == pytest.approx(3.2) and surrogate.b == chosen and search.b == chosen
    assert search.last_cosines[2] == pytest.approx(1.0, abs=1e-4)
    assert search.last_cosines[2] > search.last_cosines[1]
    assert _toy_search(b_best=2.8)[0] == pytest.approx(2.8)
    assert _toy_search(b_best=3.0)[0] == 3.0


def test_dspike_search_keeps_b_when_the_estimate_says_nothing():
    chosen, search, _ = _toy_search(b_best=3.2, sign=-1.0)  # every candidate anti-correlated
    assert chosen == 3.0 and max(search.last_cosines) < 0
    chosen, search, _ = _toy_search(b_best=3.2, scale=0.0)  # the loss never moves
    assert chosen == 3.0 and search.last_zero == 16

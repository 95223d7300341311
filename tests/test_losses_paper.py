"""TWO and TET against numbers worked out by hand, and the AdaLi boundary schedules
against the authors' arithmetic.

Logits used below (T = 2, one sample, two classes): o_0 = [1, 0], o_1 = [0, 2].
"""
import math

import pytest
import torch

from spikegrad import losses
from spikegrad.schedules import ADALI_KINDS, adali_bound

LOGITS = torch.tensor([[[1.0, 0.0]], [[0.0, 2.0]]])  # [T=2, B=1, K=2]


def test_two_official_decodes_by_the_weighted_mean():
    two = losses.TWO(2, alpha=0.3, warmup=1, variant="official")
    assert torch.allclose(two.decode(LOGITS), torch.tensor([[0.5, 1.0]]))
    # per-step accuracies 1 and 1/2: target acc / mean(acc) = [4/3, 2/3],
    # a = 0.7 * 1 + 0.3 * [4/3, 2/3] = [1.1, 0.9]; decode = ([1.1, 0] + [0, 1.8]) / 2
    two._correct, two._seen = torch.tensor([2.0, 1.0]), 2
    two.end_epoch(0)
    assert torch.allclose(two.weights, torch.tensor([1.1, 0.9]))
    assert torch.allclose(two.decode(LOGITS), torch.tensor([[0.55, 0.9]]))


def test_two_paper_decodes_by_the_weighted_sum():
    two = losses.TWO(2, alpha=0.3, warmup=1, variant="paper")
    # a = [1/2, 1/2]: the sum of a_t o_t is the mean over time, not half of it
    assert torch.allclose(two.decode(LOGITS), torch.tensor([[0.5, 1.0]]))
    # accuracies [1, 0]: a = 0.7 * 0.5 + 0.3 * [1, 0] = [0.65, 0.35]
    two._correct, two._seen = torch.tensor([3.0, 0.0]), 3
    two.end_epoch(0)
    assert torch.allclose(two.weights, torch.tensor([0.65, 0.35]))
    assert torch.allclose(two.decode(LOGITS), torch.tensor([[0.65, 0.70]]))


def test_two_warmup_keeps_the_weights_for_that_many_epochs():
    """warmup=6 is the authors' code (a = 1 while epoch <= 5, 0-based): the first update
    uses epoch 5's accuracies and applies from epoch 6 on."""
    two = losses.TWO(2, alpha=0.3, warmup=6)
    for epoch in range(5):
        two.observe(LOGITS, torch.tensor([0]))
        two.end_epoch(epoch)
        assert torch.equal(two.weights, torch.ones(2))
    two.observe(LOGITS, torch.tensor([0]))  # step 0 right, step 1 wrong: acc [1, 0]
    two.end_epoch(5)
    assert torch.allclose(two.weights, torch.tensor([0.7 + 0.3 * 2, 0.7]))


def test_tet_weights_its_terms_by_one_minus_lambda_and_lambda():
    logits = torch.tensor([[[0.0, 0.0]], [[math.log(3.0), 0.0]]])
    target = torch.tensor([0])
    ce = (math.log(2.0) + math.log(4.0 / 3.0)) / 2  # CE(o_0) = ln 2, CE(o_1) = ln(4/3)
    mse = (3 * 1.0 + (math.log(3.0) - 1.0) ** 2) / 4  # against phi = 1, four entries
    assert losses.TET().loss(logits, target).item() == pytest.approx(ce, rel=1e-6)
    got = losses.TET(lam=0.25, phi=1.0).loss(logits, target).item()
    assert got == pytest.approx(0.75 * ce + 0.25 * mse, rel=1e-6)
    assert got == pytest.approx(0.555916, abs=1e-5)  # the same, as a number


@pytest.mark.parametrize("epochs", [2, 5, 500])
def test_adali_linear_is_the_authors_arithmetic_line(epochs):
    # the authors' code: slope (low - high)/(E - 1), at 1-based epoch e1 = e + 1
    k = (0.3 - 1.5) / (epochs - 1)
    for e in range(epochs):
        assert adali_bound(e, epochs, 1.5, 0.3, "linear") == pytest.approx(k * (e + 1) + 1.5 - k)
    assert adali_bound(epochs - 1, epochs, 1.5, 0.3, "linear") == pytest.approx(0.3)


def test_adali_sqrt_is_the_authors_arithmetic_curve():
    E = 500
    k = (0.3 - 1.5) / math.sqrt(E - 1)
    for e in (0, 1, 10, 250, E - 1):
        assert adali_bound(e, E, 1.5, 0.3, "sqrt") == pytest.approx(k * math.sqrt(e + 1) + 1.5 - k)
    # ends short of the lower bound, as the authors' code does: 1.5 - 1.2 * 0.956235 = 0.352518
    assert adali_bound(E - 1, E, 1.5, 0.3, "sqrt") == pytest.approx(0.352518, abs=1e-6)


def test_adali_log_and_the_geometric_options():
    E = 100
    assert adali_bound(0, E, 1.5, 0.3, "log") == pytest.approx(1.5)
    assert adali_bound(9, E, 1.5, 0.3, "log") == pytest.approx(1.5 * 0.2 ** 0.5)  # ln 10 / ln 100
    assert adali_bound(E - 1, E, 1.5, 0.3, "log") == pytest.approx(0.3)
    mid = (E - 1) / 2
    assert adali_bound(int(mid), E, 1.0, 0.25, "linear-geometric") == pytest.approx(0.25 ** (int(mid) / 99))
    assert adali_bound(int(mid), E, 1.0, 0.25, "sqrt-geometric") == pytest.approx(0.25 ** math.sqrt(int(mid) / 99))
    # arithmetic and geometric differ in the middle of training
    assert adali_bound(49, E, 1.5, 0.3, "linear") > adali_bound(49, E, 1.5, 0.3, "linear-geometric") + 0.2


@pytest.mark.parametrize("kind", ADALI_KINDS)
def test_adali_every_kind_starts_high_and_never_rises(kind):
    values = [adali_bound(e, 50, 1.5, 0.3, kind) for e in range(50)]
    assert values[0] == pytest.approx(1.5)
    assert all(b <= a + 1e-12 for a, b in zip(values, values[1:]))
    assert adali_bound(0, 1, 1.5, 0.3, kind) == 1.5

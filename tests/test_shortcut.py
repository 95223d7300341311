"""Shortcut back-propagation: branches, combined losses, gradients and export."""
import pytest
import torch
from torch.nn import functional as F

from spikegrad.models import create_model
from spikegrad.shortcut import ShortcutNet

T, B, K = 2, 2, 5
ARGS = {"num_classes": K, "T": T, "width": 0.25}


def rate_ce(logits, target):
    """Cross-entropy of the time-averaged logits ``[T, B, K]``."""
    return F.cross_entropy(logits.mean(0), target)


def batch(seed=0, channels=3, size=32):
    gen = torch.Generator().manual_seed(seed)
    return torch.rand(B, channels, size, size, generator=gen), torch.randint(0, K, (B,), generator=gen)


def test_training_forward_gives_main_and_branch_logits():
    net = ShortcutNet(create_model("resnet18", **ARGS))
    assert net.attach == ["layer1", "layer2", "layer3"]
    main, branches = net(batch()[0])
    assert main.shape == (T, B, K)
    assert [b.shape for b in branches] == [(T, B, K)] * 3
    assert [net.branches[s].fc.in_features for s in net.attach] == [16, 32, 64]
    subset = ShortcutNet(create_model("vgg11", **ARGS), attach=["stage2"])
    assert len(subset(batch()[0])[1]) == 1 and list(subset.branches) == ["stage2"]


@pytest.mark.parametrize("name", ["resnet34", "plain-16"])
def test_export_is_the_plain_model(name):
    torch.manual_seed(0)
    model = create_model(name, **ARGS)
    net = ShortcutNet(model)
    exported = net.export()
    assert exported is model
    vanilla = create_model(**model.config)
    assert list(exported.state_dict()) == list(vanilla.state_dict())
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert count(exported) == count(vanilla) < count(net)
    assert set(net.state_dict()) == {f"model.{k}" for k in vanilla.state_dict()} | {
        f"branches.{s}.fc.{p}" for s in model.stages for p in ("weight", "bias")}


def test_eval_mode_gives_the_exported_models_output():
    torch.manual_seed(0)
    net = ShortcutNet(create_model("resnet20", **ARGS))
    x, _ = batch()
    net(x)  # a training step's forward moves BN statistics
    net.eval()
    out = net(x)
    assert isinstance(out, torch.Tensor) and torch.equal(out, net.export()(x))


def test_bad_attach_and_combine_raise():
    model = create_model("resnet18", **ARGS)
    for attach in (["layer4"], ["stage1"], [], ["layer1", "layer1"]):
        with pytest.raises(ValueError, match="layer1, layer2, layer3"):
            ShortcutNet(model, attach=attach)
    with pytest.raises(ValueError, match="combine must be one of logits, losses"):
        ShortcutNet(model, combine="sum")


def test_combine_formulas():
    torch.manual_seed(0)
    main, b1, b2 = torch.randn(3, T, B, K)
    y = torch.tensor([1, 3])
    model = create_model("plain-8", **ARGS)
    logits = ShortcutNet(model, combine="logits").loss(main, [b1, b2], y, 0.3, rate_ce)
    torch.testing.assert_close(logits, rate_ce(main + 0.3 * (b1 + b2), y))
    losses = ShortcutNet(model, combine="losses").loss(main, [b1, b2], y, 0.3, rate_ce)
    torch.testing.assert_close(losses, rate_ce(main, y) + 0.3 * (rate_ce(b1, y) + rate_ce(b2, y)) / 2)


def first_conv_grad(model):
    return model.stage1.conv1.conv.weight.grad


@pytest.mark.parametrize("combine", ["logits", "losses"])
def test_branches_send_more_gradient_to_the_first_layer_of_a_deep_plain_net(combine):
    torch.manual_seed(0)
    args = dict(ARGS, width=0.125)
    net = ShortcutNet(create_model("plain-16", **args), combine=combine)
    vanilla = create_model("plain-16", **args)
    vanilla.load_state_dict(net.export().state_dict())
    x, y = batch()
    rate_ce(vanilla(x), y).backward()
    main, branches = net(x)
    torch.testing.assert_close(main, vanilla(x))  # same weights, same batch
    net.loss(main, branches, y, 1.0, rate_ce).backward()
    assert first_conv_grad(net.model).norm() > first_conv_grad(vanilla).norm()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in net.branches.parameters())


def test_lambda_zero_is_vanilla_training():
    torch.manual_seed(0)
    net = ShortcutNet(create_model("plain-8", **ARGS))
    vanilla = create_model("plain-8", **ARGS)
    vanilla.load_state_dict(net.export().state_dict())
    x, y = batch()
    rate_ce(vanilla(x), y).backward()
    main, branches = net(x)
    net.loss(main, branches, y, 0.0, rate_ce).backward()
    torch.testing.assert_close(first_conv_grad(net.model), first_conv_grad(vanilla))
    assert all(p.grad.abs().sum() == 0 for p in net.branches.parameters())

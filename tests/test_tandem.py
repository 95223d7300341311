"""Local Tandem Learning: teacher twin and loading, target normalisation, local-only gradients,
and a short run through the Trainer and the CLI."""
import pytest
import torch
from torch.nn import functional as F

from spikegrad import checkpoint
from spikegrad.cli import main
from spikegrad.config import load_config
from spikegrad.layers import ClampReLU, neuron_layers
from spikegrad.losses import RateCE
from spikegrad.methods import create as create_method
from spikegrad.models import create_model
from spikegrad.tandem import LTL, TandemNet, ann_twin, load_teacher, normalise_target, percentile
from spikegrad.checkpoint import load_inference_model
from spikegrad.train import Trainer

T, B, K = 2, 4, 5
ARGS = {"num_classes": K, "T": T, "width": 0.25, "in_channels": 1}


def batch(seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.rand(B, 1, 28, 28, generator=gen), torch.randint(0, K, (B,), generator=gen)


def tandem(name, **kw):
    torch.manual_seed(0)
    student = create_model(name, **ARGS, **kw)
    return TandemNet(student, ann_twin(student))


def test_ann_twin_is_the_same_net_with_clamp_activations_and_one_step():
    student = create_model("resnet20", **ARGS)
    for teacher in (ann_twin(student), ann_twin("resnet20", **ARGS)):
        assert teacher.T == 1 and teacher.config["neuron"]["type"] == "clamp"
        assert [n for n, _ in neuron_layers(teacher)] == [n for n, _ in neuron_layers(student)]
        assert all(isinstance(m, ClampReLU) and m.clamp_max == 2.0 for _, m in neuron_layers(teacher))
        assert {k: v.shape for k, v in teacher.state_dict().items()} == \
               {k: v.shape for k, v in student.state_dict().items()}
        assert teacher(batch()[0]).shape == (1, B, K)


@pytest.mark.parametrize("n", [1, 2, 7, 1000, 4099])
def test_percentile_is_torch_quantile(n):
    a = torch.randn(n, generator=torch.Generator().manual_seed(n)).abs()
    for q in (0.0, 0.5, 0.999, 1.0):
        # float64 reference: torch.quantile in float32 rounds the rank q * (n - 1) itself
        torch.testing.assert_close(percentile(a, q).double(), torch.quantile(a.double(), q))


def test_target_normalisation_matches_the_formula():
    a = 2 * torch.rand(8, 3, 5, 5, generator=torch.Generator().manual_seed(0))
    a[0] = 0.0
    target = normalise_target(a)
    torch.testing.assert_close(target, torch.clamp(a / torch.quantile(a.flatten(), 0.999), 0, 1))
    assert target.shape == a.shape and target.max() == 1.0 and (target[0] == 0).all()
    assert (target == 1).float().mean() < 0.01  # only the top 0.1% saturate
    assert torch.equal(normalise_target(torch.zeros(4, 3)), torch.zeros(4, 3))  # a silent layer


def test_local_losses_are_mse_of_firing_rate_and_normalised_teacher_activation():
    net = tandem("plain-8")
    x, _ = batch()
    rates, acts = {}, {}
    hooks = [m.register_forward_hook(lambda mod, i, o, n=n: rates.__setitem__(n, o.mean(0)))
             for n, m in neuron_layers(net.student)]
    hooks += [m.register_forward_hook(lambda mod, i, o, n=n: acts.__setitem__(n, o[0]))
              for n, m in neuron_layers(net.teacher)]
    out = net(x)
    for h in hooks:
        h.remove()
    assert list(out.local) == [n for n, _ in neuron_layers(net.student)]
    for name, loss in out.local.items():
        expected = F.mse_loss(rates[name], torch.clamp(acts[name] / torch.quantile(acts[name], 0.999), 0, 1))
        torch.testing.assert_close(loss, expected)
    assert not net.student._forward_hooks and not net.teacher._forward_hooks  # hooks only during forward


def conv_bn(prefix):
    """Parameter names of a ``layers.conv_bn`` block."""
    return {f"{prefix}.{p}" for p in ("conv.weight", "bn.weight", "bn.bias")}


def touched(loss, params):
    """Names of the parameters that get a nonzero gradient from ``loss``."""
    grads = torch.autograd.grad(loss, list(params.values()), retain_graph=True, allow_unused=True)
    return {name for name, g in zip(params, grads) if g is not None and g.abs().sum() > 0}


@pytest.mark.parametrize("name,kw", [("plain-8", {}), ("resnet20", {}), ("resnet18", {"sew": True}),
                                     ("resnet19", {}), ("ltl-vgg11", {"norm": "none"})])
def test_each_local_loss_reaches_only_its_own_layer_and_ce_only_the_classifier(name, kw):
    net = tandem(name, **kw)
    x, y = batch()
    out = net(x)
    params = dict(net.student.named_parameters())
    owned = {layer: touched(loss, params) for layer, loss in out.local.items()}
    assert all(owned.values()), "every layer learns from its own loss"
    assert sum(len(s) for s in owned.values()) == len(set().union(*owned.values()))  # disjoint
    ce = touched(RateCE().loss(out.logits, y), params)  # fc.weight too unless the last layer is silent
    assert "head.fc.bias" in ce and ce <= {"head.fc.weight", "head.fc.bias"}
    assert set().union(*owned.values()) | {"head.fc.weight", "head.fc.bias"} == set(params)
    if name == "resnet20":  # a projecting block: the shortcut path belongs to the add's neuron
        assert owned["layer2.0.sn1"] == conv_bn("layer2.0.conv1")
        assert owned["layer2.0.sn2"] == conv_bn("layer2.0.conv2") | conv_bn("layer2.0.downsample")
    if name == "plain-8":
        assert owned["stage3.sn2"] == conv_bn("stage3.conv2")
    if name == "ltl-vgg11":  # the two hidden FC layers learn from their own local losses
        assert owned["head.hidden.sn1"] == {"head.hidden.fc1.weight", "head.hidden.fc1.bias"}
        assert owned["head.hidden.sn2"] == {"head.hidden.fc2.weight", "head.hidden.fc2.bias"}


def test_local_weight_scales_the_local_losses_and_q_sets_the_target_quantile():
    x, y = batch()
    losses = []
    for weight in (1.0, 3.0):
        method = LTL(RateCE(), teacher="unused.pt", local_weight=weight, q=0.9)
        student = create_model("plain-8", **ARGS)
        student.load_state_dict(tandem("plain-8").student.state_dict())
        net = method.wrap(student)
        object.__setattr__(net, "_teacher", tandem("plain-8").teacher)
        assert net.q == 0.9
        torch.manual_seed(1)
        out = net(x)
        local = torch.stack(list(out.local.values())).sum()
        loss, logits = method.loss(out, y)
        torch.testing.assert_close(loss, RateCE().loss(logits, y) + weight * local)
        losses.append(float(local.detach()))
    assert losses[0] == pytest.approx(losses[1])
    cfg = load_config(None, ["method=ltl", "teacher=t.pt", "method.local_weight=4"]).method
    assert create_method(cfg, RateCE()).local_weight == 4.0
    with pytest.raises(ValueError, match="local_weight"):
        load_config(None, ["method.local_weight=-1"])
    teacher = tandem("plain-8").teacher
    first = neuron_layers(teacher)[0][1]
    seen = []
    handle = first.register_forward_hook(lambda m, a, out: seen.append(out))
    teacher(x)
    handle.remove()
    torch.testing.assert_close(net.targets(x)["stage1.sn1"], normalise_target(seen[0].mean(0), 0.9))


def test_finetune_epochs_switch_to_end_to_end_training():
    method = LTL(RateCE(), teacher="unused.pt", finetune_epochs=1)
    net = method.wrap(create_model("plain-8", **ARGS))
    x, y = batch()
    method.set_progress(epoch=1, epochs=2, step=0, steps_per_epoch=10)
    assert not net.local
    loss, logits = method.loss(net(x), y)  # the teacher file is never needed here
    torch.testing.assert_close(loss, RateCE().loss(logits, y))
    assert "stage1.conv1.conv.weight" in touched(loss, dict(net.student.named_parameters()))
    method.set_progress(epoch=0, epochs=2, step=0, steps_per_epoch=10)
    assert net.local


def save_ann(path, **kw):
    model = ann_twin("plain-8", **{**ARGS, **kw})
    checkpoint.save({"kind": "model", "version": "test", "model_name": model.config["name"],
                     "model_kwargs": {k: v for k, v in model.config.items() if k != "name"},
                     "state_dict": model.state_dict(), "decoder": {"name": "ce"}}, path)
    return model


def test_load_teacher_from_an_exported_model_file(tmp_path):
    saved = save_ann(tmp_path / "ann.pt")
    teacher = load_teacher(tmp_path / "ann.pt", create_model("plain-8", **ARGS))
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
    x, _ = batch()
    torch.testing.assert_close(teacher(x), saved.eval()(x))


@pytest.mark.parametrize("init", [False, True])
def test_student_starts_from_the_teacher_only_when_asked(tmp_path, init):
    teacher = save_ann(tmp_path / "ann.pt")
    torch.manual_seed(1)
    net = LTL(RateCE(), teacher=tmp_path / "ann.pt", init_from_teacher=init).wrap(create_model("plain-8", **ARGS))
    student, ann = net.student.state_dict(), teacher.state_dict()
    assert set(student) == set(ann)
    same = [torch.equal(student[k], ann[k]) for k in ann if k.endswith(("conv.weight", "fc.weight"))]
    assert len(same) == 9 and (all(same) if init else not any(same))


def test_a_teacher_of_another_architecture_gives_one_clear_error(tmp_path):
    save_ann(tmp_path / "wide.pt", width=0.5)
    student = create_model("plain-8", **ARGS)
    message = (r"teacher '.*wide.pt' \(plain-8\) does not match the student \(plain-8\): teacher layer "
               r"'stage1.conv1.conv.weight' has shape \[32,1,3,3\], student expects \[16,1,3,3\]")
    with pytest.raises(ValueError, match=message):
        load_teacher(tmp_path / "wide.pt", student)
    with pytest.raises(ValueError, match=r"\(resnet20\) does not match the student \(plain-8\): the teacher "
                                         r"has no layer 'stage1.conv1.conv.weight'"):
        TandemNet(student, ann_twin("resnet20", **ARGS))
    net = TandemNet(student, tmp_path / "wide.pt")  # a path is loaded on the first training step
    with pytest.raises(ValueError, match=message):
        net(batch()[0])
    with pytest.raises(ValueError, match=r"teacher checkpoint '.*missing.pt' does not exist"):
        load_teacher(tmp_path / "missing.pt", student)
    with pytest.raises(ValueError, match="method 'ltl' needs a teacher"):
        create_method(load_config(None, ["method=ltl"]).method, RateCE())


FAST = ["data.limit_train=512", "data.limit_test=200", "model.width=0.125", "model.T=2", "batch_size=32",
        "epochs=1", "neuron.backend=eager", "optim.name=adam", "optim.lr=0.003", "log_every=100"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("runs")
    common = FAST + [f"out={out}"]
    Trainer(load_config(None, common + ["name=ann", "method=ann"]), progress=False).fit()
    teacher = out / "ann" / "checkpoints" / "best.pt"
    ltl = ["name=ltl", "method=ltl", f"teacher={teacher}", "epochs=2"]
    trainer = Trainer(load_config(None, common + ltl), progress=False)
    x, _ = next(iter(trainer.train_loader(0)))
    before = trainer.net.local_losses(x)
    trainer.fit()
    trainer.net.train()
    return {"out": out, "before": before, "after": trainer.net.local_losses(x), "trainer": trainer}


def test_a_short_ltl_run_reduces_the_local_losses(runs):
    before, after = runs["before"], runs["after"]
    assert list(before) == [n for n, _ in neuron_layers(runs["trainer"].model)]
    assert sum(after.values()) < 0.7 * sum(before.values())
    assert all(after[n] < before[n] for n in before)


def test_ltl_runs_restore_export_and_eval_without_the_teacher(runs, tmp_path, capsys):
    out = runs["out"]
    (out / "ann" / "checkpoints" / "best.pt").rename(tmp_path / "teacher-moved.pt")
    best = out / "ltl" / "checkpoints" / "best.pt"
    model, _, state = load_inference_model(best)
    assert set(state["net"]) == {f"student.{k}" for k in model.state_dict()}
    assert list(model.state_dict()) == list(create_model(**model.config).state_dict())
    main(["export", str(best), str(tmp_path / "model.pt")])
    main(["eval", str(tmp_path / "model.pt"), "--limit", "200"])
    accuracy = float(capsys.readouterr().out.split("test accuracy: ")[1].split("%")[0])
    assert accuracy == pytest.approx(runs["trainer"].best_acc)

"""Lean training memory (spikegrad.memory): exact gradients and exact byte accounting."""
import copy

import pytest
import torch
from torch import nn

from spikegrad import memory
from spikegrad.models import create_model
from spikegrad.neuron import LIF


def _bn_pair(channels: int, momentum: float | None) -> tuple[nn.BatchNorm2d, memory.BatchNorm2d]:
    ours = memory.BatchNorm2d(channels, momentum=momentum).double()
    with torch.no_grad():
        ours.weight.uniform_(0.5, 2.0).mul_(torch.tensor([1.0, -1.0, 1.0])[:channels])
        ours.bias.normal_()
    theirs = nn.BatchNorm2d(channels, momentum=momentum).double()
    theirs.load_state_dict(ours.state_dict())
    return theirs, ours


@pytest.mark.parametrize("momentum", [0.1, None])
def test_batchnorm_saving_output_matches_pytorch(momentum):
    torch.manual_seed(0)
    theirs, ours = _bn_pair(3, momentum)
    for _ in range(3):  # running statistics evolve identically over several steps
        x = (torch.randn(6, 3, 5, 4, dtype=torch.float64) * 3 + 1).requires_grad_()
        upstream = torch.randn(6, 3, 5, 4, dtype=torch.float64)
        grads = []
        for bn in (theirs, ours):
            y = bn(x)
            grads.append((y, *torch.autograd.grad((y * upstream).sum(), (x, bn.weight, bn.bias))))
        for a, b in zip(*grads):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)
    for key, value in theirs.state_dict().items():
        torch.testing.assert_close(ours.state_dict()[key], value, rtol=1e-12, atol=0)


def test_batchnorm_gradcheck():
    torch.manual_seed(1)
    _, ours = _bn_pair(3, 0.1)
    x = torch.randn(4, 3, 3, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda x, w, b: memory.batch_norm_saving_output(x, w, b, None, None, 0.1, 1e-5),
        (x, ours.weight, ours.bias))


def test_batchnorm_falls_back_when_gamma_is_near_zero():
    torch.manual_seed(2)
    theirs, ours = _bn_pair(3, 0.1)
    with torch.no_grad():
        for bn in (theirs, ours):
            bn.weight[1] = 0.0  # (y - beta) / gamma would divide by zero
    x = torch.randn(4, 3, 3, 3, dtype=torch.float64, requires_grad=True)
    assert not ours._saves_output(x)
    g_theirs = torch.autograd.grad(theirs(x).pow(2).sum(), x)[0]
    g_ours = torch.autograd.grad(ours(x).pow(2).sum(), x)[0]
    torch.testing.assert_close(g_ours, g_theirs, rtol=1e-12, atol=1e-12)


def _tiny(name: str, **kwargs) -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    channels, size = (1, 28) if name.startswith("plain") else (3, 32)
    model = create_model(name, num_classes=10, T=2, in_channels=channels, width=0.125, **kwargs)
    return model, torch.randn(3, channels, size, size)


def _grads_and_bytes(model: nn.Module, x: torch.Tensor, compact: bool) -> tuple[list, int]:
    model = copy.deepcopy(model)
    with memory.saved_tensors(compact=compact) as record:
        out = model(x)
    kept = record.nbytes
    out.pow(2).mean().backward()
    assert record.nbytes == 0  # backward released everything the forward kept
    return [p.grad for p in model.parameters()], kept


@pytest.mark.parametrize("backend", ["torch", "eager"])
@pytest.mark.parametrize("name, kwargs", [("plain-8", {}), ("resnet18", {}), ("resnet18", {"sew": True}),
                                          ("vgg11", {}), ("resnet18", {"channels_last": False})])
def test_compact_spikes_gives_identical_gradients(name, kwargs, backend, monkeypatch):
    monkeypatch.setenv("SPIKEGRAD_BACKEND", backend)
    model, x = _tiny(name, **kwargs)
    grads_on, bytes_on = _grads_and_bytes(model, x, compact=True)
    grads_off, bytes_off = _grads_and_bytes(model, x, compact=False)
    assert all(torch.equal(a, b) for a, b in zip(grads_on, grads_off))
    assert bytes_on < bytes_off


def _conv_inputs(model: nn.Module, x: torch.Tensor) -> list[tuple[str, int, int]]:
    """``(name, input numel, output numel)`` of every conv in one forward."""
    seen = []
    hooks = [m.register_forward_hook(lambda m, i, o, n=n: seen.append((n, i[0].numel(), o.numel())))
             for n, m in model.named_modules() if isinstance(m, nn.Conv2d)]
    with torch.no_grad():
        model(x)
    for h in hooks:
        h.remove()
    return seen


@pytest.mark.parametrize("channels_last", [True, False])
def test_spikes_are_saved_as_bits(channels_last):
    model, x = _tiny("plain-8", channels_last=channels_last)
    _, bytes_on = _grads_and_bytes(model, x, compact=True)
    _, bytes_off = _grads_and_bytes(model, x, compact=False)
    convs = _conv_inputs(model, x)
    inputs = [numel for _, numel, _ in convs[1:]]  # every conv but the first reads spikes
    assert bytes_off - bytes_on == sum(4 * n - -(-n // 8) for n in inputs)


@pytest.mark.parametrize("numel", [1, 7, 8, 9, 64, 1001])
def test_bit_packing_round_trips(numel):
    torch.manual_seed(numel)
    spikes = (torch.rand(numel) < 0.4).float()
    bits = memory.pack_bits(spikes)
    assert bits.dtype == torch.uint8 and bits.numel() == -(-numel // 8)
    assert torch.equal(memory.unpack_bits(bits, numel, torch.float32), spikes)


def test_spikes_saved_by_several_layers_are_unpacked_once(monkeypatch):
    """Three layers save views of one spike tensor (two as it is, one reshaped): backward
    unpacks the bits once, every layer gets the right values, and the float copy is let go
    after the last of them."""
    calls = []
    unpack = memory.unpack_bits
    monkeypatch.setattr(memory, "unpack_bits", lambda *args: calls.append(args[1]) or unpack(*args))
    torch.manual_seed(5)
    x = torch.randn(3, 2, 8) + 0.5
    weights = [torch.randn(8, requires_grad=True) for _ in range(2)]
    matrix = torch.randn(12, 3, requires_grad=True)
    with memory.saved_tensors() as record:
        s = LIF(backend="eager")(x)
        loss = (s * weights[0]).sum() + (s * weights[1]).pow(2).sum() + (s.reshape(-1, 12) @ matrix).sum()
    (mark,) = [m for m in record.marks.values() if m.bits is not None]
    assert mark.pending == 3
    grads = torch.autograd.grad(loss, [*weights, matrix])
    spikes = s.detach()
    torch.testing.assert_close(grads[0], spikes.sum((0, 1)))
    torch.testing.assert_close(grads[1], (2 * spikes * spikes * weights[1].detach()).sum((0, 1)))
    torch.testing.assert_close(grads[2], spikes.reshape(-1, 12).sum(0)[:, None].expand(12, 3))
    assert calls == [spikes.numel()] and mark.pending == 0 and mark.unpacked is None


def test_batchnorm_and_neuron_share_one_saved_tensor(monkeypatch):
    monkeypatch.setenv("SPIKEGRAD_BACKEND", "eager")  # the fused neuron saves its input; the reference loop saves more
    model, x = _tiny("plain-8")
    _, ours = _grads_and_bytes(model, x, compact=True)
    native = copy.deepcopy(model)
    for parent in native.modules():
        for key, child in list(parent.named_children()):
            if isinstance(child, memory.BatchNorm2d):
                plain_bn = nn.BatchNorm2d(child.num_features)
                plain_bn.load_state_dict(child.state_dict())
                setattr(parent, key, plain_bn)
    _, theirs = _grads_and_bytes(native, x, compact=True)
    convs = _conv_inputs(model, x)
    conv_outputs = sum(out for _, _, out in convs) * 4  # what PyTorch's BN keeps besides the neuron
    per_channel = sum(m.num_features for m in model.modules() if isinstance(m, nn.BatchNorm2d)) * 4 * 4
    assert abs((theirs - ours) - conv_outputs) <= per_channel


def test_spikes_changed_in_place_are_saved_as_they_are():
    torch.manual_seed(3)
    x = torch.randn(2, 4, 5) + 1.0
    w = torch.randn(5, requires_grad=True)
    with memory.saved_tensors() as record:
        s = LIF(backend="eager")(x)
        s.mul_(2.5)  # no longer 0/1: must not be packed to uint8
        loss = (s * w).sum()
    assert record.nbytes >= s.numel() * 4  # kept as floats
    (grad,) = torch.autograd.grad(loss, w)
    torch.testing.assert_close(grad, s.detach().sum((0, 1)))


@pytest.mark.parametrize("backend", ["torch", "eager"])
def test_residual_input_equals_adding_it_first(backend):
    torch.manual_seed(4)
    x = torch.randn(3, 2, 4, 5, requires_grad=True)
    r = (torch.rand(3, 2, 4, 5) < 0.3).float().requires_grad_()
    sn = LIF(tau=2.0, v_reset=None, backend=backend)
    upstream = torch.randn(3, 2, 4, 5)
    out_sum = sn(x + r)
    out_res = sn(x, residual=r)
    assert torch.equal(out_sum, out_res)
    g_sum = torch.autograd.grad((out_sum * upstream).sum(), (x, r))
    g_res = torch.autograd.grad((out_res * upstream).sum(), (x, r))
    for a, b in zip(g_sum, g_res):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


def test_fused_neuron_keeps_only_its_inputs():
    x = torch.randn(4, 3, 8, requires_grad=True)
    r = torch.randn(4, 3, 8, requires_grad=True)
    sn = LIF(backend="eager")
    with memory.saved_tensors() as record:
        out = sn(x)  # the graph lives as long as its output
    assert record.nbytes == x.numel() * 4  # no membrane, no default initial state
    with memory.saved_tensors() as record:
        out = sn(x, residual=r)
    assert out.requires_grad and record.nbytes == (x.numel() + r.numel()) * 4  # the sum is not stored


@pytest.mark.parametrize("compact", [True, False])
def test_models_own_hooks_shadow_outer_ones_unless_switched_off(compact):
    model, x = _tiny("plain-8")
    model.compact_spikes = compact
    seen = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: seen.append(t) or t, lambda t: t):
        model(x)
    assert (len(seen) == 0) == compact


def test_bit_packing_covers_every_byte_pattern():
    patterns = torch.arange(256)
    spikes = ((patterns[:, None] >> torch.arange(8)) & 1).float()  # [256, 8], bit i of pattern
    bits = memory.pack_bits(spikes)
    assert torch.equal(bits, patterns.to(torch.uint8))
    assert torch.equal(memory.unpack_bits(bits, spikes.numel(), torch.float64), spikes.reshape(-1).double())


def test_relayout_gives_a_one_channel_image_channels_last_strides_so_the_conv_output_follows():
    """A [N, 1, H, W] image reads as contiguous and channels-last at once; oneDNN then writes
    the first convolution's output contiguous, and every later layer pays a copy. relayout
    re-strides the channel (a view, no copy) so the output comes out channels-last."""
    from spikegrad.layers import Conv2d
    image = torch.rand(4, 1, 12, 12)
    viewed = memory.relayout(image, torch.channels_last)
    assert viewed.stride() == (144, 1, 12, 1) and viewed.data_ptr() == image.data_ptr()
    assert torch.equal(viewed, image)
    tail = memory.relayout(image[1:], torch.channels_last)  # a view with a storage offset keeps it
    assert tail.data_ptr() == image[1:].data_ptr() and torch.equal(tail, image[1:])
    conv = Conv2d(1, 8, 3, padding=1, bias=False)
    conv.channels_last = True
    out = conv(image)
    assert out.is_contiguous(memory_format=torch.channels_last) and not out.is_contiguous()
    assert torch.allclose(out, nn.functional.conv2d(image, conv.weight, padding=1), atol=1e-6)
    assert memory.relayout(image, torch.contiguous_format) is image  # the other way: untouched

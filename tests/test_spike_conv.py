"""Spike-aware convolutions (``kernels.spike_conv``): the forward and the weight gradient
computed from the active inputs agree with the dense convolution, the input and bias
gradients with autograd's, for every geometry the kernels handle; the layers take the
path only for spikes a neuron marked, only where the rule (or the switch) says, and
fall back to dense without a compiler.

Tolerance: float32 results within 1e-5 (absolute; weights scaled by 1/sqrt(fan-in), so
outputs and gradients are of order 1) of the float64 dense reference, the same bound the
dense float32 convolution meets.
"""
import os
import shutil
import subprocess
import warnings

import pytest
import torch
from torch.nn import functional as F

from spikegrad import layers, memory
from spikegrad.kernels import spike_conv
from spikegrad.models import create_model

pytestmark = pytest.mark.skipif(not spike_conv.available(), reason="no C++ compiler to build the kernels")

TOL = dict(rtol=1e-5, atol=1e-5)

# (N, C_in, side, C_out, kernel, stride, padding, dilation): odd sizes, every channel
# block (64, the 8-multiples, the scalar tail), strides, dilation, kernels 1 to 5 and
# two that are not square
GEOMETRIES = [(3, 5, 9, 11, 3, 1, 1, 1), (2, 8, 7, 70, 3, 2, 1, 1), (2, 16, 8, 16, 1, 2, 0, 1),
              (2, 3, 10, 9, 5, 1, 2, 2), (2, 40, 6, 130, 3, 1, 0, 1), (1, 7, 12, 3, 3, 3, 1, 1),
              (2, 33, 5, 64, 2, 2, 1, 1), (2, 10, 7, 12, (2, 3), 1, (0, 1), 1), (1, 9, 8, 20, (3, 1), 2, 1, 1)]


def _case(N, C, side, Co, k, density=0.3, seed=0):
    kh, kw = (k, k) if isinstance(k, int) else k
    gen = torch.Generator().manual_seed(seed)
    spikes = (torch.rand(N, C, side, side, generator=gen) < density).float()
    weight = torch.randn(Co, C, kh, kw, generator=gen) / (C * kh * kw) ** 0.5
    bias = torch.randn(Co, generator=gen)
    return spikes, weight, bias


@pytest.mark.parametrize("geometry", GEOMETRIES)
def test_products_match_the_dense_convolution_in_float64(geometry):
    _check_products(geometry)


def test_the_portable_build_matches_too(tmp_path, monkeypatch):
    """Built for the baseline of the architecture (no -march=native: no AVX on x86-64),
    as a compiler that refuses -march=native builds it: the scalar listing of active
    channels and the vector extension's fallback code."""
    compiler = os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++")
    built = tmp_path / "portable.so"
    subprocess.run([compiler, *spike_conv._FLAGS, "-fopenmp", str(spike_conv._SOURCE), "-o", str(built)],
                   check=True, capture_output=True)
    lib = spike_conv._load(built)
    monkeypatch.setattr(spike_conv, "library", lambda: lib)
    for geometry in GEOMETRIES:
        _check_products(geometry)


def _check_products(geometry):
    N, C, side, Co, k, stride, padding, dilation = geometry
    spikes, weight, bias = _case(N, C, side, Co, k)
    ref = F.conv2d(spikes.double(), weight.double(), None, stride, padding, dilation)
    out = spike_conv.forward(spikes, weight, stride, padding, dilation)
    torch.testing.assert_close(out, ref.float(), **TOL)
    assert out.is_contiguous(memory_format=torch.channels_last)
    grad = torch.randn(ref.shape, generator=torch.Generator().manual_seed(1))
    w64 = weight.double().requires_grad_()
    (ref_grad,) = torch.autograd.grad(F.conv2d(spikes.double(), w64, None, stride, padding, dilation), w64,
                                      grad.double())
    torch.testing.assert_close(spike_conv.weight_grad(spikes, grad, weight.shape, stride, padding, dilation),
                               ref_grad.float(), **TOL)


def test_weights_in_any_layout_give_the_same_results_and_gradients_keep_the_weights_layout():
    spikes, weight, _ = _case(2, 37, 7, 21, 3)  # channel counts off the kernels' 16-channel tiles
    grad = torch.randn(2, 21, 7, 7, generator=torch.Generator().manual_seed(4))
    out = spike_conv.forward(spikes, weight, 1, 1)
    wide = torch.zeros(21, 74, 3, 3)
    wide[:, 1::2] = weight
    innermost = weight.permute(3, 2, 1, 0).contiguous().permute(3, 2, 1, 0)  # output channels innermost
    for layout in (weight.contiguous(memory_format=torch.channels_last), wide[:, 1::2], innermost):
        assert torch.equal(spike_conv.forward(spikes, layout, 1, 1), out)  # wide[:, 1::2]: a storage offset
    dense = spike_conv.weight_grad(spikes, grad, weight.shape, 1, 1)
    assert dense.is_contiguous()
    for like in (weight.contiguous(memory_format=torch.channels_last), innermost, wide[:, 1::2]):
        kept = spike_conv.weight_grad(spikes, grad, weight.shape, 1, 1, like=like)
        assert torch.equal(kept, dense)
        assert kept.stride() == (like.stride() if like.is_contiguous(memory_format=torch.channels_last)
                                 or like is innermost else dense.stride())  # not dense: contiguous
    param = torch.nn.Parameter(weight.contiguous(memory_format=torch.channels_last))
    spike_conv.conv2d(spikes, param, None, 1, 1, 1, spike_conv.Plan(False, True)).backward(grad)
    assert param.grad.stride() == param.stride() and torch.equal(param.grad, dense)


@pytest.mark.parametrize("plan", [spike_conv.Plan(True, True), spike_conv.Plan(True, False),
                                  spike_conv.Plan(False, True)])
def test_every_gradient_of_the_autograd_function_matches_autograd_on_the_dense_conv(plan):
    spikes, weight, bias = _case(2, 12, 8, 20, 3)
    inputs = [t.clone().requires_grad_() for t in (spikes, weight, bias)]
    out = spike_conv.conv2d(*inputs, 2, 1, 1, plan)
    grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(2))
    grads = torch.autograd.grad(out, inputs, grad)
    ref_inputs = [t.double().requires_grad_() for t in (spikes, weight, bias)]
    ref = F.conv2d(*ref_inputs, 2, 1, 1)
    torch.testing.assert_close(out, ref.float(), **TOL)
    for got, want in zip(grads, torch.autograd.grad(ref, ref_inputs, grad.double()), strict=True):
        torch.testing.assert_close(got, want.float(), **TOL)


def test_results_do_not_depend_on_the_thread_count():
    spikes, weight, _ = _case(4, 24, 12, 72, 3)
    grad = torch.randn(4, 72, 12, 12, generator=torch.Generator().manual_seed(3))
    before = torch.get_num_threads()
    results = []
    for threads in (1, 3):
        torch.set_num_threads(threads)
        results.append((spike_conv.forward(spikes, weight, 1, 1), spike_conv.weight_grad(spikes, grad, weight.shape, 1, 1)))
    torch.set_num_threads(before)
    assert all(torch.equal(a, b) for a, b in zip(*results))


def test_spike_count_counts_every_nonzero_in_any_layout():
    x = (torch.rand(3, 5, 7, 9) < 0.4).float()
    assert spike_conv.spike_count(x) == int(x.count_nonzero())
    assert spike_conv.spike_count(x.contiguous(memory_format=torch.channels_last)) == int(x.count_nonzero())
    assert spike_conv.spike_count(x.transpose(1, 3)) == int(x.count_nonzero())  # not dense: copied first


def _with_density(density, channels=64):
    x = torch.zeros(2, channels, 8, 8)
    x.view(-1)[: round(density * x.numel())] = 1.0
    return x


def test_the_rule_takes_each_product_only_below_its_measured_density(monkeypatch):
    monkeypatch.setitem(spike_conv.MAX_DENSITY, "avx2", {"forward": 0.2, "weight": 0.3})
    wide = torch.randn(64, 64, 3, 3)
    assert spike_conv.plan_for(_with_density(0.1), wide, "auto", "avx2") == spike_conv.Plan(True, True)
    assert spike_conv.plan_for(_with_density(0.25), wide, "auto", "avx2") == spike_conv.Plan(False, True)
    assert spike_conv.plan_for(_with_density(0.35), wide, "auto", "avx2") is None
    assert spike_conv.plan_for(_with_density(0.1), torch.randn(64, 64, 1, 1), "auto", "avx2") is None  # 1x1
    narrow = spike_conv.MIN_CHANNELS - 1
    assert spike_conv.plan_for(_with_density(0.1, narrow), torch.randn(64, narrow, 3, 3), "auto", "avx2") is None
    assert spike_conv.plan_for(_with_density(0.1), torch.randn(narrow, 64, 3, 3), "auto", "avx2") is None
    assert spike_conv.plan_for(_with_density(0.1), wide, "auto", "avx512") is None  # not measured: dense
    assert spike_conv.plan_for(_with_density(0.1), wide, "off", "avx2") is None
    assert spike_conv.plan_for(_with_density(1.0), wide, "on", "avx512") == spike_conv.Plan(True, True)
    assert spike_conv.plan_for(_with_density(0.1).double(), wide.double(), "on", "avx2") is None  # float32 only
    with pytest.raises(ValueError, match="spike_conv must be one of auto, on, off, got 'fast'"):
        spike_conv.plan_for(_with_density(0.1), wide, "fast", "avx2")


def _counting(monkeypatch):
    calls = []
    real = spike_conv.conv2d
    monkeypatch.setattr(spike_conv, "conv2d", lambda *a, **k: calls.append(a[-1]) or real(*a, **k))
    return calls


def _step(model, x):
    model.zero_grad()
    out = model(x)
    out.square().mean().backward()
    return out.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


def test_a_model_takes_the_path_for_its_spike_inputs_only_and_trains_the_same(monkeypatch):
    """ResNet-20 (width 1/4): every conv after the first gets spikes and takes the path
    (but the strided 1x1 ones oneDNN must run contiguous); on == off within the tolerance,
    forward and every gradient; the first conv (the image) and the ANN twin (ReLU
    activations) never take it."""
    calls = _counting(monkeypatch)
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(4))
    results = {}
    for mode in ("off", "on"):
        torch.manual_seed(0)
        model = create_model("resnet20", 10, T=2, width=0.25, spike_conv=mode)
        calls.clear()
        results[mode] = _step(model, x)
        spiking = [m for m in model.modules() if isinstance(m, layers.Conv2d)][1:]  # all but the image's
        assert len(calls) == (sum(map(layers.channels_last_is_safe, spiking)) if mode == "on" else 0)
    torch.testing.assert_close(results["on"][0], results["off"][0], **TOL)
    for name, grad in results["off"][1].items():
        torch.testing.assert_close(results["on"][1][name], grad, rtol=1e-4, atol=1e-5, msg=name)
    torch.manual_seed(0)
    twin = create_model("resnet20", 10, T=1, width=0.25, neuron={"type": "relu"}, spike_conv="on")
    calls.clear()
    _step(twin, x)
    assert calls == []


def test_autocast_keeps_the_dense_convolution(monkeypatch):
    calls = _counting(monkeypatch)
    torch.manual_seed(0)
    model = create_model("resnet20", 10, T=1, width=0.5, spike_conv="on")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        model(torch.randn(1, 3, 8, 8))
    assert calls == []
    model(torch.randn(1, 3, 8, 8))
    assert calls


def test_only_spikes_a_neuron_marked_count_as_spikes():
    x = (torch.rand(2, 4, 5, 5) < 0.5).float()
    assert not memory.is_spikes(x)  # no saved_tensors() block
    with memory.saved_tensors():
        assert not memory.is_spikes(x)  # 0/1 values, but nobody marked them
        memory.mark_spikes(x)
        assert memory.is_spikes(x) and memory.is_spikes(x.flatten(0, 1))
        x.mul_(2)  # changed in place: no longer the marked spikes
        assert not memory.is_spikes(x)


def test_saved_memory_is_the_same_on_the_spike_path():
    x = torch.randn(2, 3, 16, 16)
    saved = {}
    for mode in ("off", "on"):
        torch.manual_seed(0)
        model = create_model("resnet20", 10, T=2, width=0.25, spike_conv=mode)
        model.compact_spikes = False
        with memory.saved_tensors() as record:
            out = model(x)
            saved[mode] = record.nbytes
        out.sum().backward()
    assert saved["on"] <= saved["off"]


def test_without_a_compiler_auto_stays_dense_and_on_says_why(monkeypatch):
    monkeypatch.setattr(spike_conv, "library", lambda: None)
    spikes, weight, _ = _case(2, 64, 8, 64, 3, density=0.01)
    assert spike_conv.plan_for(spikes, weight, "auto", "avx2") is None
    with pytest.raises(RuntimeError, match="need a C\\+\\+ compiler"):
        spike_conv.plan_for(spikes, weight, "on", "avx2")


def test_a_failed_build_warns_and_leaves_the_convolutions_dense(monkeypatch, tmp_path):
    """A compiler that fails: one warning with its last error line, no library, nothing
    left in the cache; a missing compiler: no library either."""
    fake = tmp_path / "cc"
    fake.write_text('#!/bin/sh\nif [ "$1" = --version ]; then echo fake 1.0; exit 0; fi\n'
                    'echo "error: boom" >&2\nexit 1\n')
    fake.chmod(0o755)
    monkeypatch.setenv("SPIKEGRAD_CACHE_DIR", str(tmp_path / "cache"))
    try:
        for compiler, warns in ((fake, True), (tmp_path / "no-such-compiler", False)):
            monkeypatch.setenv("CXX", str(compiler))
            spike_conv.library.cache_clear()
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                assert spike_conv.library() is None and not spike_conv.available()
            messages = [str(w.message) for w in caught]
            assert messages == (["spikegrad: could not build the spike-aware convolutions with "
                                 f"{fake} (error: boom); convolutions stay dense"] if warns else [])
        assert list((tmp_path / "cache").iterdir()) == []
    finally:
        monkeypatch.undo()
        spike_conv.library.cache_clear()
    assert spike_conv.available()


def test_the_build_is_cached_per_source_and_host(monkeypatch, tmp_path):
    monkeypatch.setenv("SPIKEGRAD_CACHE_DIR", str(tmp_path))
    spike_conv.library.cache_clear()
    try:
        lib = spike_conv.library()
        built = list(tmp_path.glob("spike_conv-*.so"))
        assert lib is not None and len(built) == 1
        spike_conv.library.cache_clear()
        spike_conv.library()
        assert list(tmp_path.glob("spike_conv-*.so")) == built and list(tmp_path.iterdir()) == built  # no leftovers
    finally:
        monkeypatch.undo()
        spike_conv.library.cache_clear()


def test_create_model_rejects_an_unknown_mode():
    with pytest.raises(ValueError, match="spike_conv"):
        create_model("plain-8", 10, T=1, width=0.25, spike_conv="fast")


def test_the_config_key_takes_yaml_on_and_off_as_words():
    from spikegrad.config import ConfigError, from_dict

    assert from_dict({"model": {"spike_conv": False}}).model.spike_conv == "off"  # `spike_conv: off` in YAML
    assert from_dict({"model": {"spike_conv": True}}).model.spike_conv == "on"
    with pytest.raises(ConfigError, match="'model.spike_conv' must be one of auto, on, off, got 'fast'"):
        from_dict({"model": {"spike_conv": "fast"}})


def test_the_kernels_keep_within_their_buffers_under_glibc_heap_checks():
    """Every geometry, both products, 1 and 2 threads, in a fresh interpreter with glibc's
    heap checks on and freed memory poisoned: a write past a buffer aborts it."""
    import os
    import subprocess
    import sys

    script = f"""
import torch
from spikegrad.kernels import spike_conv
for threads in (1, 2):
    torch.set_num_threads(threads)
    for N, C, side, Co, k, stride, padding, dilation in {GEOMETRIES!r}:
        for density in (0.0, 0.3, 1.0):
            s = (torch.rand(N, C, side, side) < density).float()
            w = torch.randn(Co, C, *((k, k) if isinstance(k, int) else k))
            out = spike_conv.forward(s, w, stride, padding, dilation)
            spike_conv.weight_grad(s, torch.randn_like(out), w.shape, stride, padding, dilation)
            [torch.empty(997 * i) for i in range(1, 20)]
print("ok")
"""
    env = {**os.environ, "MALLOC_CHECK_": "3", "MALLOC_PERTURB_": "165"}
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-2000:]

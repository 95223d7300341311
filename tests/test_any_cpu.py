"""No convolution spikegrad runs may corrupt the heap on any x86-64 CPU.

oneDNN's channels-last weight gradient of strided 1x1 convolutions with a few input
channels corrupts memory on AVX2 CPUs (AMD hosts; docs/performance.md, "Convolutions
oneDNN must not run channels-last"). Each check runs in a fresh interpreter on oneDNN's
AVX2 code path (``ONEDNN_MAX_CPU_ISA=AVX2``, which an AVX-512 host honours too) with
glibc's heap checks on (``MALLOC_CHECK_=3``, freed memory filled by ``MALLOC_PERTURB_``),
one thread, and must exit cleanly: the dangerous shapes through ``layers.Conv2d``, one
training step of every registry model at widths 0.125 and 0.25 (and its ANN twin, and
the fused backend), and a compiled model.
"""
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from torch import nn

from spikegrad import layers
from spikegrad.layers import channels_last_is_safe

AVX2 = {"ONEDNN_MAX_CPU_ISA": "AVX2", "MALLOC_CHECK_": "3", "MALLOC_PERTURB_": "165",
        "OMP_NUM_THREADS": "1", "SPIKEGRAD_BACKEND": "torch"}

# (in, out, kernel, stride, side): shapes that abort or corrupt the heap when run channels-last
DANGEROUS = [(4, 8, 1, 2, 16), (2, 4, 1, 2, 28), (3, 64, 1, 2, 16), (6, 16, 1, 2, 8), (2, 2, 1, 2, 32)]

PRELUDE = """
import torch
from spikegrad.layers import Conv2d
from spikegrad.models import create_model, list_models
from spikegrad.tandem import ann_twin
torch.manual_seed(0)

def churn():
    return [torch.empty(997 * i) for i in range(1, 40)]

def step(model, channels, side):
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = torch.rand(4, channels, side, side), torch.randint(0, 10, (4,))
    loss = torch.nn.functional.cross_entropy(model(x).mean(0), y)
    loss.backward()
    opt.step()
    churn()
    assert torch.isfinite(loss), loss
"""


def _run(body: str, timeout: int = 280) -> None:
    """Run ``body`` (after ``PRELUDE``) in a fresh interpreter under the AVX2 setting; it must exit 0."""
    script = PRELUDE + textwrap.dedent(body)
    proc = subprocess.run([sys.executable, "-c", script], env={**os.environ, **AVX2}, capture_output=True,
                          text=True, timeout=timeout)
    assert proc.returncode == 0, f"exit {proc.returncode}:\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"
    assert proc.stdout.strip().endswith("clean"), proc.stdout[-2000:]


@pytest.mark.parametrize("shape", DANGEROUS)
def test_the_rule_routes_the_dangerous_shapes_contiguous(shape):
    c_in, c_out, k, s, side = shape
    assert not channels_last_is_safe(nn.Conv2d(c_in, c_out, k, s))


def test_dangerous_shapes_run_clean_through_spikegrads_conv():
    _run(f"""
    for c_in, c_out, k, s, side in {DANGEROUS!r}:
        conv = Conv2d(c_in, c_out, k, s, k // 2, bias=False)
        conv.channels_last = True
        for _ in range(20):
            x = torch.rand(4, c_in, side, side).contiguous(memory_format=torch.channels_last).requires_grad_()
            conv(x).backward(torch.randn(4, c_out, side // s, side // s))
            churn()
    print("clean")
    """)


def test_one_training_step_of_every_model_and_its_twin_at_small_widths_runs_clean():
    _run("""
    names = [n for n in list_models() if not n.startswith("plain-")] + ["plain-8"]
    for i, name in enumerate(names):
        channels, side = (1, 28) if i % 2 else (3, 32)
        for width in (0.125, 0.25):
            model = create_model(name, num_classes=10, T=2, width=width, in_channels=channels)
            step(model, channels, side)
            step(ann_twin(model), channels, side)
    step(create_model("resnet20", T=2, width=0.125, in_channels=1, backend="eager"), 1, 28)
    step(create_model("resnet18", T=2, width=0.125, stem="imagenet", backend="eager"), 3, 64)
    print("clean")
    """)


def test_a_compiled_model_runs_clean():
    _run("""
    from spikegrad.layers import SeqToANN, compile_model, conv_bn, make_neuron
    from spikegrad.surrogate import ATan
    net = torch.nn.Sequential(conv_bn(4, 8, 1, 2), make_neuron({"backend": "torch"}, ATan()),
                              SeqToANN(torch.nn.Flatten(), torch.nn.Linear(8 * 8 * 8, 10)))
    compiled = compile_model(net)
    for _ in range(3):
        x = torch.rand(2, 4, 4, 16, 16)
        compiled(x).sum().backward()
        churn()
    print("clean")
    """)


@pytest.mark.parametrize("capability, limit, kind", [
    ("AVX512", "", "avx512"), ("AVX512", "AVX512_CORE", "avx512"), ("AVX512", "AVX2", "avx2"),
    ("AVX2", "", "avx2"), ("AVX2", "SSE41", "other"), ("DEFAULT", "", "other"), ("AVX512", "SSE41", "other"),
])
def test_the_cpu_kind_follows_the_capability_and_onednns_own_limit(monkeypatch, capability, limit, kind):
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: capability)
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", limit)
    assert layers.cpu_kind() == kind


@pytest.mark.parametrize("kind, side, last", [("avx512", 4, False), ("avx512", 8, True), ("avx2", 4, True),
                                              ("avx2", 2, False), ("other", 4, False)])
def test_the_layout_rule_is_the_cpu_kinds(monkeypatch, kind, side, last):
    monkeypatch.setattr(layers, "_MIN_PIXELS", layers.CHANNELS_LAST_MIN_PIXELS[kind])
    conv = layers.Conv2d(16, 16, 3, 1, 1, bias=False)
    conv.channels_last = True
    out = conv(torch.rand(2, 16, side, side))
    assert out.is_contiguous(memory_format=torch.channels_last) == last
    assert out.is_contiguous() != last

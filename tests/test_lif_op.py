"""The fused neuron as a PyTorch operator (``torch.ops.spikegrad.lif``, kernels/lif.py).

``opcheck`` checks the schema, the autograd registration and the fake implementations
(also under AOT dispatch with dynamic shapes) on the plain-torch kernels; a small model
compiles as one graph (``fullgraph=True``) and gives the eager model's outputs and
gradients; the functional ``lif_multistep`` takes what the modules take; a missing
triton is one clear error line.
"""
import ast
import copy
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import spikegrad.kernels
from spikegrad import layers, memory, neuron, surrogate as sg
from spikegrad.kernels import lif as lif_op

KERNELS_DIR = Path(lif_op.__file__).parent


def _args(residual=False, v_init=False, decay=False, norm=False, dtype=torch.float64):
    gen = torch.Generator().manual_seed(0)
    shape = (3, 2, 4, 3, 3) if norm else (3, 2, 5)
    x = (torch.randn(shape, generator=gen, dtype=dtype) + 0.5).requires_grad_()
    r = torch.randn(shape, generator=gen, dtype=dtype).requires_grad_() if residual else None
    v0 = (0.3 * torch.randn(shape[1:], generator=gen, dtype=dtype)).requires_grad_() if v_init else None
    d = torch.tensor(0.4, dtype=dtype, requires_grad=True) if decay else None
    w = torch.rand(4, generator=gen, dtype=dtype).add(0.5).requires_grad_() if norm else None
    b = torch.randn(4, generator=gen, dtype=dtype).requires_grad_() if norm else None
    return x, r, v0, d, w, b


SURROGATE = sg.ATan()


def _kwargs(**over):
    kwargs = dict(fixed_decay=0.5, decay_input=False, v_threshold=1.0, v_reset=0.0, detach_reset=False,
                  surrogate=lif_op.surrogate_handle(SURROGATE), norm_eps=1e-5, keep_state=True,
                  mark_spikes=True, backend="eager")
    kwargs.update(over)
    return kwargs


@pytest.mark.parametrize("inputs, options", [
    (dict(), dict()),
    (dict(residual=True, v_init=True, decay=True), dict(decay_input=True, v_reset=None)),
    (dict(residual=True, norm=True), dict(detach_reset=True, keep_state=False)),
    (dict(v_init=True, decay=True, norm=True), dict(v_reset=-0.2)),
])
def test_opcheck(inputs, options):
    torch.library.opcheck(torch.ops.spikegrad.lif.default, _args(**inputs), _kwargs(**options))


def test_opcheck_layouts():
    """Spikes and gradients come back in the input's layout when it has a memory order
    (channels-last), else contiguous (time not outermost): the fake implementations agree."""
    x, r, v0, _, w, b = _args(residual=True, v_init=True, norm=True)
    channels_last = x.detach().flatten(0, 1).contiguous(memory_format=torch.channels_last).unflatten(0, (3, 2))
    time_inner = x.detach().transpose(0, 1).contiguous().transpose(0, 1)
    for leaf in (channels_last, time_inner):
        leaf = leaf.requires_grad_()
        torch.library.opcheck(torch.ops.spikegrad.lif.default, (leaf, r, v0, None, w, b), _kwargs())
    spikes = torch.ops.spikegrad.lif(time_inner, None, None, None, None, None, **_kwargs())[0]
    assert spikes.is_contiguous()


def test_opcheck_backward():
    x, r, v0, d, w, b = (t.detach() if t is not None else None for t in _args(True, True, True, True))
    mean, var = torch.var_mean(x, dim=(0, 1, 3, 4), correction=0)
    grads = torch.randn_like(x), torch.randn_like(v0)
    options = {k: v for k, v in _kwargs().items() if k != "mark_spikes"}
    torch.library.opcheck(torch.ops.spikegrad.lif_backward.default, (*grads, x, r, v0, d, w, b, mean, var),
                          dict(options, decay_grad=True), test_utils=("test_schema", "test_faketensor"))


class _Block(nn.Module):
    """conv -> BN -> LIF, conv -> BN -> PLIF with the first spikes as residual, from an initial membrane."""

    def __init__(self, backend: str, surrogate: sg.Surrogate) -> None:
        super().__init__()
        self.conv1, self.conv2 = layers.conv_bn(2, 4), layers.conv_bn(4, 4)
        self.sn1 = neuron.LIF(tau=2.0, backend=backend, surrogate=surrogate)
        self.sn2 = neuron.PLIF(init_tau=3.0, backend=backend, surrogate=surrogate, v_reset=None)

    def forward(self, x, v_init):
        s = self.conv1.fire(self.sn1, x)
        h = self.conv2.conv(s.flatten(0, 1)).unflatten(0, s.shape[:2])
        s2, v = self.sn2(h, v_init, True, s, self.conv2.bn)
        return s2.mean((0, 3, 4)) * 3 + v.mean((2, 3)), s2


def _run_block(model, x, v_init):
    x, v_init = x.clone().requires_grad_(), v_init.clone().requires_grad_()
    with memory.saved_tensors():
        out, spikes = model(x, v_init)
    out.pow(2).sum().backward()
    return [out, spikes, x.grad, v_init.grad] + [p.grad for p in model.parameters()]


@pytest.mark.parametrize("surrogate", [sg.ATan(), sg.Dspike(b=2.0)])
def test_model_compiles_as_one_graph(surrogate):
    """``fullgraph=True`` raises on a graph break; outputs and every gradient agree with
    the eager model. The kernels are the eager set (no inner compile); the outer compile
    is AOT autograd without inductor, which traces the fake and backward registrations."""
    torch.manual_seed(0)
    model = _Block("eager", surrogate).double().train()
    x, v_init = torch.randn(3, 2, 2, 6, 6, dtype=torch.float64), torch.zeros(2, 4, 6, 6, dtype=torch.float64)
    expected = _run_block(copy.deepcopy(model), x, v_init)
    compiled_model = copy.deepcopy(model)
    got = _run_block(torch.compile(compiled_model, fullgraph=True, backend="aot_eager"), x, v_init)
    for a, b in zip(expected, got):
        torch.testing.assert_close(b, a, rtol=1e-9, atol=1e-9)
    if isinstance(surrogate, sg.Dspike):  # backward reads the live surrogate: a new temperature counts
        for m in (model, compiled_model):
            m.sn1.surrogate.b = m.sn2.surrogate.b = 5.0
            m.zero_grad()
        expected = _run_block(model, x, v_init)
        got = _run_block(torch.compile(compiled_model, fullgraph=True, backend="aot_eager"), x, v_init)
        for a, b in zip(expected[2:], got[2:]):
            torch.testing.assert_close(b, a, rtol=1e-9, atol=1e-9)


def test_lif_multistep_takes_residual_norm_and_learnable_tau():
    """The functional form equals the module with the same residual, folded norm and
    initial membrane (both through the operator), and the reference ``bn(x) + r``."""
    x, r, v0, _, _, _ = _args(residual=True, v_init=True, norm=True)
    bn = memory.BatchNorm2d(4).double()
    w = torch.tensor(-0.4, dtype=torch.float64, requires_grad=True)
    results = []
    for call in ("module", "functional", "reference"):
        leaves = [t.detach().clone().requires_grad_() for t in (x, r, v0)]
        norm = copy.deepcopy(bn)
        if call == "module":
            cell = neuron.PLIF(init_tau=2.0, backend="eager", detach_reset=True).double()
            with torch.no_grad():
                cell.w.copy_(w)
            spikes, v = cell(leaves[0], leaves[2], True, leaves[1], norm)
            w_grad = lambda: cell.w.grad  # noqa: E731
        else:
            tau = 1 / torch.sigmoid(w)
            w.grad = None
            inputs = (leaves[0], norm) if call == "functional" else (norm(leaves[0].flatten(0, 1)).unflatten(0, (3, 2)) + leaves[1], None)
            spikes, v = neuron.lif_multistep(inputs[0], leaves[2], tau=tau, detach_reset=True, return_state=True,
                                             residual=leaves[1] if call == "functional" else None, norm=inputs[1],
                                             backend="eager" if call == "functional" else "torch")
            w_grad = lambda: w.grad  # noqa: E731
        weights = torch.linspace(-1, 1, spikes.numel(), dtype=spikes.dtype).view_as(spikes)
        ((spikes * weights).sum() + v.pow(2).sum()).backward()
        results.append([spikes.detach(), v.detach(), *(t.grad for t in leaves), w_grad(),
                        norm.weight.grad, norm.running_mean, norm.running_var])
    for other in results[1:]:
        assert torch.equal(results[0][0], other[0])
        for a, b in zip(results[0][1:], other[1:]):
            torch.testing.assert_close(b, a, rtol=1e-6, atol=1e-8)


def test_missing_triton_is_one_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "triton", None)  # import triton now fails as if not installed
    monkeypatch.delitem(sys.modules, "spikegrad.kernels.triton_lif", raising=False)
    monkeypatch.delattr(spikegrad.kernels, "triton_lif", raising=False)  # imported by an earlier test
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    lif_op._built.cache_clear()
    try:
        with pytest.raises(ValueError, match=r"needs the triton package.*pip install") as err:
            neuron.LIF(backend="triton")(torch.randn(3, 2, 4))
    finally:
        lif_op._built.cache_clear()
    assert "\n" not in str(err.value)


def test_backends_are_the_operator_kernels():
    assert neuron.BACKENDS == ("auto", "torch", *lif_op.KERNELS)
    assert set(lif_op.KERNELS) == {"eager", "fused", "triton"}


def _spikegrad_imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    return {node.module or "" for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.level > 0} | {
        alias.name for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.level > 0
        and node.module is None for alias in node.names}


def test_kernel_modules_import_one_way():
    """lif -> triton_lif (lazily) -> fused; fused imports nothing of spikegrad."""
    assert _spikegrad_imports(KERNELS_DIR / "fused.py") == set()
    assert _spikegrad_imports(KERNELS_DIR / "triton_lif.py") == {"fused"}


def test_compiled_kernels_leave_dynamo_config_alone():
    limit = torch._dynamo.config.recompile_limit
    x = torch.randn(2, 3, 4)
    neuron.LIF(backend="fused")(x)
    assert torch._dynamo.config.recompile_limit == limit


def test_import_loads_neither_triton_nor_the_compiler():
    """Backends load lazily: importing spikegrad's neurons and models imports no triton
    (and not dynamo, which would import it)."""
    code = ("import sys, spikegrad.neuron, spikegrad.models; "
            "print(sorted(m for m in ('triton', 'torch._dynamo') if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0 and done.stdout.strip() == "[]", done.stderr[-2000:]

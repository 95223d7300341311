"""What ``backend="auto"`` runs on CPU, and the trainer's background compile (kernels/warmup.py).

A script's first operator calls run the uncompiled kernels (a quick try compiles nothing);
a run records its first step's calls, compiles them in a background process on copies
(MSG's generator and torch's global random state untouched), and switches at a fixed
step, where every graph comes from the warm cache.
"""
import copy
import os
import subprocess
import sys

import pytest
import torch
from torch import nn

from spikegrad import layers, memory, surrogate as sg
from spikegrad.kernels import lif as lif_op, warmup
from spikegrad.neuron import LIF


@pytest.fixture(autouse=True)
def fresh_policy(monkeypatch):
    """Each test starts from a process that has made no operator call yet (and no
    ``$SPIKEGRAD_BACKEND``, which the suite sets to the reference backend)."""
    monkeypatch.delenv("SPIKEGRAD_BACKEND", raising=False)
    saved, threads = vars(lif_op.AUTO).copy(), torch.get_num_threads()
    lif_op.AUTO.__init__()
    yield lif_op.AUTO
    vars(lif_op.AUTO).update(saved)
    torch.set_num_threads(threads)


@pytest.fixture
def chosen(monkeypatch):
    """The kernel set names the operator asked for; every call runs the eager kernels."""
    names = []

    def kernel_set(name, x, surrogate):
        names.append(name)
        return lif_op._built("eager")
    monkeypatch.setattr(lif_op, "kernel_set", kernel_set)
    return names


def _net(surrogate=None):
    torch.manual_seed(0)
    return nn.Sequential(layers.Conv2d(2, 4, 3, padding=1), memory.BatchNorm2d(4),
                         LIF(surrogate=surrogate))


def _step(net, x):
    """One training step's forward and backward: ``net``'s conv, its BN folded into the LIF."""
    conv, bn, lif = net
    y = conv(x.flatten(0, 1)).unflatten(0, x.shape[:2])
    lif(y, norm=bn).sum().backward()


def _evaluate(net, x):
    conv, bn, lif = net
    with torch.no_grad():
        return lif(bn(conv(x.flatten(0, 1))).unflatten(0, x.shape[:2]))


X = torch.rand(2, 3, 2, 6, 6)  # [T, B, C, H, W]


def test_a_script_runs_eager_for_its_first_calls_then_compiled(fresh_policy, chosen):
    fresh_policy.eager_calls = 3
    neuron = LIF()
    for _ in range(5):
        neuron(torch.rand(2, 3, 4, requires_grad=True)).sum().backward()
    forward, backward = chosen[0::2], chosen[1::2]
    assert forward == ["eager"] * 3 + ["fused"] * 2
    assert backward == forward  # each backward runs where its forward ran
    with torch.no_grad():  # evaluation does not count
        fresh_policy.calls = 0
        for _ in range(5):
            neuron(torch.rand(2, 3, 4))
    assert chosen[-5:] == ["eager"] * 5 and fresh_policy.calls == 0
    fresh_policy.calls = 10
    fresh_policy.mode = "eager"  # a trainer's choice overrides the count
    neuron(torch.rand(2, 3, 4))
    assert chosen[-1] == "eager"


def test_an_explicit_backend_is_never_overridden(fresh_policy, chosen):
    fresh_policy.mode = "eager"
    LIF(backend="fused")(torch.rand(2, 3, 4))
    assert chosen == ["fused"]


def test_the_recorder_keeps_one_call_per_layout_and_adds_evaluations(fresh_policy):
    recorder = fresh_policy.recorder = warmup.Recorder()
    net = _net()
    for _ in range(2):
        _step(net, X)
    assert [r[0] for r in recorder.records()] == ["lif", "lif", "lif_backward"]
    train, evaluation = recorder.records()[:2]
    assert train[1][4] is not None and evaluation[1][4] is None  # the BN folded, then not
    assert train[1][0][:2] == ("tensor", (2, 3, 4, 6, 6)) and train[1][0][3:] == (torch.float32, "cpu")
    assert list(recorder.surrogates.values()) == [net[2].surrogate]


def test_replay_touches_neither_the_msg_generator_nor_the_global_random_state(fresh_policy):
    msg = sg.resolve({"name": "msg", "p": 0.5})
    recorder = fresh_policy.recorder = warmup.Recorder()
    _step(_net(msg), X)
    fresh_policy.recorder = None
    mask_state, global_state = msg.get_rng_state(), torch.get_rng_state()
    copies = {k: copy.deepcopy(v) for k, v in recorder.surrogates.items()}
    warmup.replay(recorder.records(), copies, backend="eager")
    assert torch.equal(torch.get_rng_state(), global_state)
    assert all(torch.equal(msg.get_rng_state()[k], v) for k, v in mask_state.items())


class _Finished:
    """A background compile that has already finished."""

    def __init__(self, records, surrogates, threads):
        self.records, self.threads = records, threads
        STARTED.append(self)

    def running(self):
        return False

    def wait(self):
        return None


STARTED = []


def test_a_run_switches_at_its_step_whatever_the_compile(fresh_policy, monkeypatch):
    monkeypatch.setattr(warmup, "BackgroundCompile", _Finished)
    STARTED.clear()
    outer = 2
    torch.set_num_threads(outer)
    plan = warmup.Warmup(steps=3, total=10, start=0, log=lambda line: None)
    modes, threads = [], []
    for step in range(5):
        plan.before_step(step)
        modes.append(fresh_policy.mode)
        if step == 0:
            _step(_net(), X)
        plan.after_step()
        threads.append(torch.get_num_threads())
    assert modes == ["eager"] * 3 + ["fused"] * 2
    assert len(STARTED) == 1 and len(STARTED[0].records) == 3  # recorded in step 0 only
    assert STARTED[0].threads == threads[-1] == outer  # compiled for the threads it runs with
    assert threads[:3] == [max(1, outer - 1)] * 3  # a core left to the compile meanwhile
    plan.close()
    assert fresh_policy.mode is None and fresh_policy.recorder is None


def test_a_resume_past_the_switch_compiles_at_once_and_a_short_run_never(fresh_policy):
    warmup.Warmup(steps=3, total=10, start=5, log=lambda line: None)
    assert fresh_policy.mode == "fused" and fresh_policy.recorder is None
    short = warmup.Warmup(steps=100, total=40, start=0, log=lambda line: None)
    for step in range(40):
        short.before_step(step)
        short.after_step()
    assert fresh_policy.mode == "eager" and short.compile is None


SWITCH = """
import torch
from torch._dynamo.utils import counters
from spikegrad.kernels import lif, warmup
from spikegrad.neuron import LIF
neuron, x = LIF(), torch.rand(2, 3, 4, 5, requires_grad=True)
def step():
    neuron(x).sum().backward()
recorder = lif.AUTO.recorder = warmup.Recorder()
lif.AUTO.mode = "eager"
step()
lif.AUTO.recorder = None
compile = warmup.BackgroundCompile(recorder.records(), recorder.surrogates, torch.get_num_threads())
step()  # training goes on meanwhile, eagerly
assert compile.wait() is None
lif.AUTO.mode = "fused"
step()
with torch.no_grad():
    neuron(x)
print(counters["inductor"]["fxgraph_cache_hit"], counters["inductor"]["fxgraph_cache_miss"])
"""


def test_after_the_background_compile_the_switch_finds_every_graph_compiled(tmp_path):
    script = SWITCH
    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "cache")}
    env.pop("SPIKEGRAD_BACKEND", None)
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True,
                         timeout=400)
    assert out.returncode == 0, out.stderr[-2000:]
    hits, misses = map(int, out.stdout.split())
    assert hits >= 2 and misses == 0  # forward (training and evaluation), backward

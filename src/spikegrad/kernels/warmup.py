"""Compile the fused neuron's kernels in the background while training runs eagerly.

A cold ``torch.compile`` of the neuron kernels takes about a minute on a small CPU; a
training run should not sit silent through it before its first step. ``Warmup`` (what
the trainer uses when ``backend="auto"`` runs on CPU) does instead:

1. the first training step runs the uncompiled (``"eager"``) kernels and records every
   operator call it makes (``Recorder``: shapes, strides, dtypes, options), plus the
   calls evaluation will make (the same inputs, no batch norm folded, no gradient);
2. a background thread (``BackgroundCompile``) replays those calls through the
   operator with backend ``"fused"``, on random tensors of the recorded layout and with
   a copy of the surrogate (MSG's mask generator is not touched), which compiles every
   graph the run needs while training goes on;
3. at step ``steps`` the run switches to the compiled kernels, waiting for the thread
   if it is not done yet (a notice says so).

The switch step is fixed by the config, not by how long compiling took, so a run, the
same run again and its resume compute the same numbers, cold cache or warm. Dynamo
restores torch's global random state after each graph it traces, whichever thread it
runs in: a model that draws from the global generator while training (Poisson encoding)
compiles in the main thread at the switch instead (``background=False``).
"""
from __future__ import annotations

import copy
import sys
import threading
import time
from typing import Any, Callable, Optional

import torch
from torch import Tensor

from .lif import AUTO, _surrogate, surrogate_handle

__all__ = ["Recorder", "BackgroundCompile", "Warmup"]


def _meta(arg: Any) -> Any:
    """A tensor as ``(shape, stride, dtype, device)``; anything else as it is."""
    if isinstance(arg, Tensor):
        return ("tensor", tuple(arg.shape), tuple(arg.stride()), arg.dtype, arg.device)
    return arg


class Recorder:
    """Called by the operator with each eager call ``(op, args, options)``; keeps one
    record per distinct call ``(op, argument layouts, options, grad mode)``."""

    def __init__(self) -> None:
        self.calls: dict[tuple, tuple] = {}

    def __call__(self, op: Callable, args: tuple, options: dict) -> None:
        record = (op, tuple(map(_meta, args)), tuple(sorted(options.items())), torch.is_grad_enabled())
        self.calls.setdefault(record, record)
        if op is torch.ops.spikegrad.lif and args[4] is not None:  # evaluation: BN unfolded, no grad
            plain = (op, (record[1][0], record[1][1], None, record[1][3], None, None), record[2], False)
            self.calls.setdefault(plain, plain)

    def records(self) -> list[tuple]:
        """The distinct calls, in the order first made."""
        return list(self.calls)


def _example(meta: Any, generator: torch.Generator) -> Any:
    """A random tensor (values in [0.5, 1.5]) laid out as ``meta`` describes, overlapping
    strides (an expanded gradient) included."""
    if not (isinstance(meta, tuple) and meta[:1] == ("tensor",)):
        return meta
    _, shape, stride, dtype, device = meta
    size = 1 + sum((n - 1) * s for n, s in zip(shape, stride) if n > 0)
    storage = torch.empty(size if all(shape) else 0, dtype=dtype, device=device)
    if dtype.is_floating_point:
        storage.uniform_(0.5, 1.5, generator=generator)
    return storage.as_strided(shape, stride)


def replay(records: list[tuple], backend: str = "fused") -> None:
    """Run each recorded call through the operator with ``backend`` (``"fused"``: compiling
    what it needs), on example tensors and copies of the surrogates."""
    generator = torch.Generator().manual_seed(0)
    copies: dict[str, Any] = {}  # kept alive until every call has run
    for op, metas, options, grad in records:
        options = dict(options)
        handle = options["surrogate"]
        if handle not in copies:
            copies[handle] = copy.deepcopy(_surrogate(handle))
        options["surrogate"] = surrogate_handle(copies[handle])
        with torch.set_grad_enabled(grad):
            op(*(_example(m, generator) for m in metas), **options, backend=backend)


class BackgroundCompile(threading.Thread):
    """``replay(records)`` in a daemon thread; ``error`` holds what it raised, if anything."""

    def __init__(self, records: list[tuple]) -> None:
        super().__init__(name="spikegrad-compile", daemon=True)
        self.records, self.error, self.seconds = records, None, 0.0

    def run(self) -> None:
        start = time.perf_counter()
        try:
            replay(self.records)
        except Exception as err:  # reported by Warmup.before_step; training goes on eagerly
            self.error = err
        self.seconds = time.perf_counter() - start


class Warmup:
    """A run's kernel schedule: eager kernels before step ``steps``, compiled from it on
    (``total``: the run's last step; a run that ends by ``steps`` never compiles).
    Call ``before_step(step)`` before each training step and ``after_step()`` after it;
    ``close()`` when the run ends (hands ``backend="auto"`` back to its default policy)."""

    def __init__(self, steps: int, total: int, start: int, background: bool = True,
                 log: Callable[[str], None] = lambda line: print(line, file=sys.stderr, flush=True)) -> None:
        self.steps, self.total, self.background, self.log = steps, total, background, log
        self.thread: Optional[BackgroundCompile] = None
        self.recorder: Optional[Recorder] = None
        compiles = total > steps
        AUTO.mode = "fused" if compiles and start >= steps else "eager"
        if compiles and start < steps and background:
            self.recorder = AUTO.recorder = Recorder()

    def before_step(self, step: int) -> None:
        if step < self.steps or AUTO.mode == "fused" or self.total <= self.steps:
            return
        if self.thread is not None and self.thread.is_alive():
            self.log(f"spikegrad: step {step}: waiting for the background compile of the neuron kernels")
            self.thread.join()
        if self.thread is not None and self.thread.error is not None:
            self.log(f"spikegrad: the background compile failed ({self.thread.error}); compiling now")
        AUTO.mode = "fused"

    def after_step(self) -> None:
        if self.recorder is None:
            return
        records, self.recorder = self.recorder.records(), None
        AUTO.recorder, AUTO.announced = None, True  # this line is the compile's notice
        self.thread = BackgroundCompile(records)
        self.log(f"spikegrad: compiling the neuron kernels in the background ({len(records)} calls); "
                 f"eager kernels until step {self.steps}")
        self.thread.start()

    def close(self) -> None:
        AUTO.mode, AUTO.recorder = None, None

"""Compile the fused neuron's kernels in a background process while training runs eagerly.

A cold ``torch.compile`` of the neuron kernels takes about a minute on a small CPU; a
training run should not sit silent through it before its first step. ``Warmup`` (what
the trainer uses when ``backend="auto"`` runs on CPU) does instead:

1. the first training step runs the uncompiled (``"eager"``) kernels and records every
   operator call it makes (``Recorder``: shapes, strides, dtypes, options, surrogate),
   plus the calls evaluation will make (the same inputs, no batch norm folded);
2. a background process (``BackgroundCompile``: ``python -m spikegrad.kernels.warmup``)
   replays those calls through the operator with backend ``"fused"`` on random tensors
   of the recorded layouts, which fills torch.compile's on-disk cache while training
   goes on (on the other core, on a 2-core machine);
3. at step ``steps`` the run switches to the compiled kernels: it waits for that process
   if it has not finished (a notice says so), then compiles from the warm cache (seconds).

Meanwhile training runs on one torch thread fewer (at least one), leaving a core to the
compile; the thread count is restored at the switch.

The switch step is fixed by the config, not by how long compiling took, so a run, the
same run again and its resume compute the same numbers, cold cache or warm. The compile
runs in another process, not a thread, because dynamo's "compiling" flag and the random
state it restores are process-wide: a tracing thread changes what the training thread's
batch norm and optimiser do.
"""
from __future__ import annotations

import os
import pickle
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Optional

import torch
from torch import Tensor

from .lif import AUTO, _surrogate, surrogate_handle

__all__ = ["Recorder", "replay", "BackgroundCompile", "Warmup"]

def _meta(arg: Any) -> Any:
    """A tensor as ``("tensor", shape, stride, dtype, device)``; anything else as it is."""
    if isinstance(arg, Tensor):
        return ("tensor", tuple(arg.shape), tuple(arg.stride()), arg.dtype, str(arg.device))
    return arg


class Recorder:
    """Called by the operator with each eager call ``(name, args, options)``; keeps one
    record ``(op name, argument layouts, options)`` per distinct call, and the surrogate
    objects they name (pickled with the records for the background process)."""

    def __init__(self) -> None:
        self.calls: dict[tuple, None] = {}
        self.surrogates: dict[str, Any] = {}

    def __call__(self, name: str, args: tuple, options: dict) -> None:
        self.surrogates.setdefault(options["surrogate"], _surrogate(options["surrogate"]))
        record = (name, tuple(map(_meta, args)), tuple(sorted(options.items())))
        self.calls.setdefault(record)
        if name == "lif" and args[4] is not None:  # evaluation: the batch norm unfolded
            metas = record[1]
            self.calls.setdefault((name, (metas[0], metas[1], None, metas[3], None, None), record[2]))

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


def replay(records: list[tuple], surrogates: dict[str, Any], backend: str = "fused") -> None:
    """Run each recorded call through the operator with ``backend`` (``"fused"``: compiling
    what it needs), on example tensors; ``surrogates`` maps the records' handles to
    surrogate objects (copies: MSG's mask generator here is not the run's)."""
    generator = torch.Generator().manual_seed(0)
    handles = {old: surrogate_handle(s) for old, s in surrogates.items()}
    with torch.no_grad():  # as the operator's implementations run
        for name, metas, options in records:
            options = dict(options, surrogate=handles[dict(options)["surrogate"]], backend=backend)
            getattr(torch.ops.spikegrad, name)(*(_example(m, generator) for m in metas), **options)


class BackgroundCompile:
    """``replay(records)`` with backend ``"fused"`` in a child process (started at once),
    which leaves the compiled kernels in torch.compile's on-disk cache. ``threads``: the
    torch thread count the kernels will run with (inductor's code, and so its cache key,
    depends on it)."""

    def __init__(self, records: list[tuple], surrogates: dict[str, Any], threads: int) -> None:
        self.folder = Path(tempfile.mkdtemp(prefix="spikegrad-compile-"))
        job = self.folder / "calls.pkl"
        job.write_bytes(pickle.dumps((records, surrogates, threads)))
        self.log = open(self.folder / "log.txt", "wb")
        self.started = time.perf_counter()
        self.process = subprocess.Popen([sys.executable, "-m", "spikegrad.kernels.warmup", str(job)],
                                        stdin=subprocess.DEVNULL, stdout=self.log, stderr=subprocess.STDOUT)

    def running(self) -> bool:
        return self.process.poll() is None

    def wait(self) -> Optional[str]:
        """Wait for the process; None if it compiled everything, else the last line it wrote."""
        code = self.process.wait()
        self.log.close()
        lines = (self.folder / "log.txt").read_text(errors="replace").strip().splitlines()
        for path in self.folder.iterdir():
            path.unlink()
        self.folder.rmdir()
        return None if code == 0 else (lines[-1] if lines else f"exit code {code}")


class Warmup:
    """A run's kernel schedule: eager kernels before step ``steps``, compiled from it on
    (``total``: the run's number of steps; a run that ends by ``steps`` never compiles;
    ``start``: the step it starts or resumes at). Call ``before_step(step)`` before each
    training step and ``after_step()`` after it; ``close()`` when the run ends."""

    def __init__(self, steps: int, total: int, start: int,
                 log: Callable[[str], None] = lambda line: print(line, file=sys.stderr, flush=True)) -> None:
        self.steps, self.total, self.log = steps, total, log
        self.threads = torch.get_num_threads()
        self.compile: Optional[BackgroundCompile] = None
        self.recorder: Optional[Recorder] = None
        compiles = total > steps
        AUTO.mode = "fused" if compiles and start >= steps else "eager"
        if compiles and start < steps:
            self.recorder = AUTO.recorder = Recorder()

    def before_step(self, step: int) -> None:
        if step < self.steps or AUTO.mode == "fused" or self.total <= self.steps:
            return
        if self.compile is not None:
            if self.compile.running():
                self.log(f"spikegrad: step {step}: waiting for the background compile of the neuron kernels")
            failed = self.compile.wait()
            if failed:
                self.log(f"spikegrad: the background compile failed ({failed}); compiling here")
            self.compile = None
            torch.set_num_threads(self.threads)
        AUTO.announced = True  # the notice was given when the background compile started
        AUTO.mode = "fused"

    def after_step(self) -> None:
        if self.recorder is None:
            return
        recorder, self.recorder = self.recorder, None
        AUTO.recorder = None
        self.compile = BackgroundCompile(recorder.records(), recorder.surrogates, self.threads)
        torch.set_num_threads(max(1, self.threads - 1))  # a core for the compile
        self.log(f"spikegrad: compiling the neuron kernels in a background process; eager "
                 f"kernels until step {self.steps}, compiled after")

    def close(self) -> None:
        """Hand ``backend="auto"`` back to its default policy and the process its thread
        count (and stop a compile still running)."""
        if self.compile is not None:
            self.compile.process.kill()
            self.compile.wait()
        torch.set_num_threads(self.threads)
        AUTO.mode, AUTO.recorder = None, None


def _main(job: str) -> None:
    records, surrogates, threads = pickle.loads(Path(job).read_bytes())
    torch.set_num_threads(threads)  # inductor's code (and so its cache key) depends on it
    replay(records, surrogates)


if __name__ == "__main__":
    _main(sys.argv[1])

"""Test defaults: the reference neuron backend unless a test asks for another.

Compiled paths cost a cold compile per graph; they are tested on a fixed small set
of shapes (test_neuron.py, test_amp_compile.py, test_norm_fold.py), never through
``backend="auto"``. ``make test`` runs the suite on two pytest-xdist workers, one torch
thread each: two workers of two threads on a 2-core machine wait on each other.
Which modules share a worker varies from run to run, so each module starts with
dynamo's state reset: shapes one module compiled would otherwise make the next one's
compile dynamic, and torch 2.13's inductor fails some dynamic recompiles ("cannot
determine truth value of Relational", after test_bench.py's compiled run).

A test never hangs the suite: pytest-timeout fails a test still running after
``timeout`` seconds (pyproject) with its traceback; a hang inside C code, where that
signal waits, is ended ``HARD_TIMEOUT_S`` later by faulthandler, which kills the worker.
A worker that dies (that, or a crash such as a heap corruption) ends ``make test``
(``--max-worker-restart=0``) with the test's name and the Python stacks faulthandler
wrote when it died (the workers' own stderr is not shown by xdist, so they go to a file
per worker that the controller attaches to the report).
"""
import faulthandler
import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("SPIKEGRAD_BACKEND", "torch")
os.environ.setdefault("MPLBACKEND", "Agg")

if "PYTEST_XDIST_WORKER" in os.environ:
    torch.set_num_threads(1)

STACKS = Path(__file__).resolve().parent.parent / ".pytest_cache" / "stacks"
HARD_TIMEOUT_S = 480  # pyproject's timeout (420 s) plus a minute
_stacks_file = None


def pytest_configure(config):
    global _stacks_file
    worker = os.environ.get("PYTEST_XDIST_WORKER")
    if worker:
        STACKS.mkdir(parents=True, exist_ok=True)
        _stacks_file = open(STACKS / f"{worker}.txt", "w")


@pytest.fixture(autouse=True)
def _stacks_when_a_worker_dies():
    if _stacks_file is None:  # not under xdist: pytest's own faulthandler shows them
        yield
        return
    faulthandler.enable(file=_stacks_file)
    faulthandler.dump_traceback_later(HARD_TIMEOUT_S, exit=True, file=_stacks_file)
    yield
    faulthandler.cancel_dump_traceback_later()


def pytest_handlecrashitem(crashitem, report, sched):
    """(xdist, in the controller) Attach the dead worker's stacks to its test's report."""
    worker = getattr(getattr(report.node, "gateway", None), "id", None)
    path = STACKS / f"{worker}.txt"
    if worker and path.is_file() and path.read_text().strip():
        report.longrepr = f"{report.longrepr}\n\nPython stacks when the worker died:\n{path.read_text()}"


@pytest.fixture(autouse=True, scope="module")
def _fresh_dynamo():
    torch._dynamo.reset()

"""Test defaults: the reference neuron backend unless a test asks for another.

Compiled paths cost a cold compile per graph; they are tested on a fixed small set
of shapes (test_neuron.py, test_amp_compile.py, test_norm_fold.py), never through
``backend="auto"``. ``make test`` runs the suite on two pytest-xdist workers, one torch
thread each: two workers of two threads on a 2-core machine wait on each other.
Which modules share a worker varies from run to run, so each module starts with
dynamo's state reset: shapes one module compiled would otherwise make the next one's
compile dynamic, and torch 2.13's inductor fails some dynamic recompiles ("cannot
determine truth value of Relational", after test_bench.py's compiled run).
"""
import os

import pytest
import torch

os.environ.setdefault("SPIKEGRAD_BACKEND", "torch")
os.environ.setdefault("MPLBACKEND", "Agg")

if "PYTEST_XDIST_WORKER" in os.environ:
    torch.set_num_threads(1)


@pytest.fixture(autouse=True, scope="module")
def _fresh_dynamo():
    torch._dynamo.reset()

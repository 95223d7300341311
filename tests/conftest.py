"""Test defaults: the reference neuron backend unless a test asks for another.

Compiled paths cost a cold compile per graph; they are tested on a fixed small set
of shapes in test_neuron.py and test_compile.py, never through ``backend="auto"``.
"""
import os

os.environ.setdefault("SPIKEGRAD_BACKEND", "torch")
os.environ.setdefault("MPLBACKEND", "Agg")

"""Forward+backward time of one multi-step LIF layer, per backend and against SpikingJelly.

    .venv/bin/python benchmarks/neuron.py [--shape 4 32 64 32 32] [--repeats 20]

The same as ``spikegrad bench neuron``; method in docs/performance.md.
"""
import sys

from spikegrad.cli import main

if __name__ == "__main__":
    main(["bench", "neuron", *sys.argv[1:]])

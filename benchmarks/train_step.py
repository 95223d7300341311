"""Training-step benchmark: ANN twin, spikegrad per T and backend, SpikingJelly and snnTorch.

    .venv/bin/python benchmarks/train_step.py [--quick] [--T 1 2 4 6] [--repeats 5] [--out DIR] ...

The same as ``spikegrad bench step`` (options: ``spikegrad bench step --help``); method and
recorded results in docs/performance.md.
"""
import sys

from spikegrad.cli import main

if __name__ == "__main__":
    main(["bench", "step", *sys.argv[1:]])

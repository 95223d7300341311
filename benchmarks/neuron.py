"""Forward+backward time of one multi-step LIF layer, per backend and against SpikingJelly.

    .venv/bin/python benchmarks/neuron.py [--shape 4 32 64 32 32] [--repeats 20]

The same as ``spikegrad bench``; results are recorded in docs/performance.md.
"""
import argparse

from spikegrad import bench

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", type=int, nargs="+", default=[4, 32, 64, 32, 32])
    parser.add_argument("--repeats", type=int, default=20)
    bench.main(parser.parse_args())

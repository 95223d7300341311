"""``spikegrad bench``: a thin entry point to the benchmarks of the source checkout.

The harness (timing rounds, memory subprocesses, reports) and the peer libraries'
networks live in the repository's ``benchmarks/`` directory (harness.py, peers.py), not
in the library: this module finds that directory beside the installed package (an
editable install from ``src/``) and hands the parsed command line to ``harness.main``.
From a wheel there is no such directory, and the command says so in one line.
Method and recorded results: docs/performance.md.
"""
from __future__ import annotations

import argparse
import importlib
import sys
from pathlib import Path
from types import ModuleType

__all__ = ["main", "benchmarks_dir", "load_harness"]


def benchmarks_dir() -> Path:
    """The ``benchmarks/`` directory of the source checkout this package is installed from.

    Raises ``FileNotFoundError`` (one line) when there is none, e.g. for a wheel install.
    """
    root = Path(__file__).resolve().parents[2]  # <checkout>/src/spikegrad/bench.py -> <checkout>
    found = root / "benchmarks"
    if not (found / "harness.py").is_file() or not (root / "src" / "spikegrad").is_dir():
        raise FileNotFoundError(f"spikegrad bench needs a source checkout (benchmarks/harness.py beside "
                                f"src/spikegrad; none at {root}): clone the repository and "
                                f"`pip install -e .` it")
    return found


def load_harness() -> ModuleType:
    """The checkout's ``benchmarks/harness.py`` as the module ``harness`` (its directory goes
    first on ``sys.path``, where the harness finds ``peers`` and its memory subprocesses
    find the harness)."""
    path = str(benchmarks_dir())
    if path not in sys.path:
        sys.path.insert(0, path)
    return importlib.import_module("harness")


def main(args: argparse.Namespace) -> None:
    """Run ``spikegrad bench`` (``args.kind``: ``step``, ``neuron`` or ``conv``) from the checkout's harness."""
    load_harness().main(args)

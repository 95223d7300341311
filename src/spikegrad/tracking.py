"""Experiment tracking beside ``metrics.jsonl``: TensorBoard event files (``tensorboard: true``).

``metrics.jsonl`` is always written; with ``tensorboard: true`` every numeric value of
every record is mirrored as a TensorBoard scalar under ``<run>/tensorboard/``, tagged
``<kind>/<key>`` (``step/loss``, ``epoch/test_acc``, ``epoch/grad_norm/<layer>``, ...)
at the record's global step. Needs the ``tensorboard`` package (``pip install
'spikegrad[tensorboard]'``); a run that asks for it without the package is refused
before anything is written.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any

__all__ = ["TensorBoard", "require_tensorboard"]

_POSITION = ("kind", "epoch", "step", "time")


def require_tensorboard() -> None:
    """One ``ValueError`` line when the ``tensorboard`` package is missing."""
    try:
        from torch.utils.tensorboard import SummaryWriter  # noqa: F401  (needs the tensorboard package)
    except ImportError:
        raise ValueError("config key 'tensorboard' is true but the tensorboard package is not installed; "
                         "pip install 'spikegrad[tensorboard]' (or tensorboard), or set tensorboard: false") from None


class TensorBoard:
    """Mirrors ``metrics.jsonl`` records into TensorBoard event files under ``run_dir/tensorboard``."""

    def __init__(self, run_dir: str | Path) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(Path(run_dir) / "tensorboard"))

    def write(self, record: dict[str, Any]) -> None:
        """Every finite number of ``record`` (a metrics.jsonl line) as a scalar at its ``step``."""
        for key, value in record.items():
            if key in _POSITION or isinstance(value, bool) or not isinstance(value, (int, float)):
                continue
            if math.isfinite(value):
                self.writer.add_scalar(f"{record['kind']}/{key}", value, global_step=record["step"],
                                       walltime=record.get("time"))
        self.writer.flush()

    def close(self) -> None:
        """Flush and close the event file."""
        self.writer.close()

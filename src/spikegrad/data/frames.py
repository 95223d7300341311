"""Event streams to frames: T slices, events counted per pixel and polarity.

``frames="count"`` (SpikingJelly's default split): T slices of N // T events,
the last one taking the remainder; with the reader's orientation this gives
exactly SpikingJelly's CIFAR10-DVS frames (for N >= T). ``frames="time"``:
event i goes to slice (t_i - t_0) T // (t_last - t_0 + 1), T equal durations
(SpikingJelly rounds the slice edges differently, so a few events can land one
slice apart). Frames hold event counts (float32, not normalised);
``resize_frames`` averages over areas, as papers do to go from 128x128 to 48x48.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from .aedat import SENSOR_SIZE, Events

__all__ = ["events_to_frames", "resize_frames"]


def _slots(events: Events, T: int, mode: str) -> np.ndarray:
    """Slice index 0..T-1 of every event."""
    n = len(events.t)
    if mode == "count":
        return np.minimum(np.arange(n) // max(n // T, 1), T - 1)
    if mode == "time":
        start = events.t.min()
        return (events.t - start) * T // (events.t.max() - start + 1)
    raise ValueError(f"frames must be 'count' or 'time', got {mode!r}")


def events_to_frames(events: Events, T: int, mode: str = "count", size: int = SENSOR_SIZE) -> Tensor:
    """``[T, 2, size, size]`` float32 event counts (``size`` is the sensor's side)."""
    cell = ((_slots(events, T, mode) * 2 + events.channel) * size + events.row) * size + events.col
    counts = np.bincount(cell, minlength=T * 2 * size * size)
    return torch.from_numpy(counts.astype(np.float32)).reshape(T, 2, size, size)


def resize_frames(frames: Tensor, size: int) -> Tensor:
    """``[T, 2, H, W]`` -> ``[T, 2, size, size]`` by area averaging (identity at the same size)."""
    if frames.shape[-2:] == (size, size):
        return frames
    return F.interpolate(frames, size=(size, size), mode="area")

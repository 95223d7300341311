"""Reader of the jAER AEDAT 2.0 files of the official CIFAR10-DVS release (DVS128 sensor).

File layout: ASCII header lines, each starting with ``#`` (the first one is
``#!AER-DAT2.0``), then 8-byte records, big-endian: uint32 address, uint32
timestamp in microseconds. DVS128 address bits: 0 polarity, 1-7 x, 8-14 y; a
record with bit 15 (sync) or bit 31 set is a special event, not a pixel, and is
dropped. (The AEDAT4 files some mirrors carry are a conversion, not read here.)

Image coordinates follow SpikingJelly's CIFAR10-DVS conversion, so frames match
the peers' and the published numbers' input: row = 127 - x, column = 127 - y,
channel = 1 - polarity bit.
"""
from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

import numpy as np

from .errors import DatasetError

__all__ = ["Events", "parse_aedat", "read_aedat", "SENSOR_SIZE"]

SENSOR_SIZE = 128
_SPECIAL = 0x80008000


class Events(NamedTuple):
    """An event stream, int64 arrays of length N in file order."""

    t: np.ndarray  # timestamp, microseconds
    row: np.ndarray  # 0..127, top to bottom
    col: np.ndarray  # 0..127, left to right
    channel: np.ndarray  # 0 or 1


def _header_end(data: bytes, source: str) -> int:
    """Offset of the first record, after the ``#`` lines; checks the format line."""
    newline = data.find(b"\n")
    first = data[:newline if newline >= 0 else 64]
    if not first.startswith(b"#!AER-DAT"):
        raise DatasetError(f"{source}: not an AEDAT file (no '#!AER-DAT' first line)")
    version = first[9:].strip().decode("ascii", "replace")
    if not version.startswith("2."):
        raise DatasetError(f"{source}: AEDAT {version} is not supported; this reader takes the "
                           "AEDAT 2.0 files of the official CIFAR10-DVS release")
    pos = 0
    while data.startswith(b"#", pos):
        end = data.find(b"\n", pos)
        if end < 0:
            raise DatasetError(f"{source}: truncated header")
        pos = end + 1
    return pos


def parse_aedat(data: bytes, source: str) -> Events:
    """Decode AEDAT 2.0 DVS128 bytes; ``source`` names them in errors."""
    body = memoryview(data)[_header_end(data, source):]
    if len(body) % 8:
        raise DatasetError(f"{source}: truncated: {len(body)} bytes of records is not a multiple of 8")
    words = np.frombuffer(body, dtype=">u4").reshape(-1, 2)
    pixel = (words[:, 0] & _SPECIAL) == 0
    address, t = words[pixel, 0].astype(np.int64), words[pixel, 1].astype(np.int64)
    if not len(address):
        raise DatasetError(f"{source}: no events")
    last = SENSOR_SIZE - 1
    return Events(t=t, row=last - ((address >> 1) & 0x7F), col=last - ((address >> 8) & 0x7F),
                  channel=1 - (address & 1))


def read_aedat(path: Path) -> Events:
    """Read one ``.aedat`` file (see the module docstring for the format)."""
    try:
        data = path.read_bytes()
    except OSError as err:
        raise DatasetError(f"{path}: cannot read ({err})") from err
    return parse_aedat(data, str(path))

"""Our own reader of the IDX format (the MNIST family's files), gzipped or plain.

An IDX file is: two zero bytes, one type byte (0x08 uint8, 0x09 int8, 0x0B int16,
0x0C int32, 0x0D float32, 0x0E float64), one byte giving the number of
dimensions, that many big-endian uint32 sizes, then the values, big-endian,
row-major. Anything else, or a size that does not match, is a DatasetError
naming the file.
"""
from __future__ import annotations

import struct
import zlib
from pathlib import Path

import numpy as np

from .errors import DatasetError

__all__ = ["read_idx", "parse_idx", "read_maybe_gzipped", "MAX_BYTES"]

MAX_BYTES = 1 << 30  # an IDX file (decompressed) larger than this is refused: no MNIST-family file is

_TYPES = {0x08: "u1", 0x09: "i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def read_maybe_gzipped(path: Path) -> bytes:
    """The bytes of ``path``, decompressed when its name ends in ``.gz``."""
    try:
        if path.stat().st_size > MAX_BYTES:
            raise DatasetError(f"{path}: larger than {MAX_BYTES >> 20} MiB; not an MNIST-family file")
        data = path.read_bytes()
        if path.suffix != ".gz":
            return data
        # bounded: a small gzip can claim gigabytes (a decompression bomb)
        inflate = zlib.decompressobj(wbits=31)
        out = inflate.decompress(data, MAX_BYTES + 1)
        if len(out) > MAX_BYTES:
            raise DatasetError(f"{path}: decompresses to more than {MAX_BYTES >> 20} MiB; refused")
        if not inflate.eof:
            raise DatasetError(f"{path}: truncated gzip stream; the file is corrupted or truncated")
        return out
    except (OSError, EOFError, zlib.error) as err:
        raise DatasetError(f"{path}: cannot read ({err}); the file is corrupted or truncated") from err


def parse_idx(data: bytes, source: str) -> np.ndarray:
    """Decode IDX bytes into a native-endian array of the stored shape; ``source`` names them."""
    if len(data) < 4 or data[:2] != b"\0\0" or data[2] not in _TYPES:
        raise DatasetError(f"{source}: not an IDX file (bad magic number {data[:4].hex() or 'none'})")
    ndim, header = data[3], 4 + 4 * data[3]
    if len(data) < header:
        raise DatasetError(f"{source}: truncated IDX header ({len(data)} bytes)")
    shape = struct.unpack(f">{ndim}I", data[4:header])
    dtype = np.dtype(_TYPES[data[2]])
    expected = header + int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if len(data) != expected:
        raise DatasetError(f"{source}: truncated or corrupted IDX file: {len(data)} bytes, "
                           f"expected {expected} for shape {list(shape)}")
    values = np.frombuffer(data, dtype=dtype, offset=header).reshape(shape)
    return values.astype(dtype.newbyteorder("="))


def read_idx(path: Path) -> np.ndarray:
    """Read an IDX file (``.gz`` or plain) into a native-endian numpy array."""
    return parse_idx(read_maybe_gzipped(path), str(path))

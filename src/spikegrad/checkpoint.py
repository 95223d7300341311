"""Checkpoint files: written atomically, read only through ``weights_only=True``.

A checkpoint is a dict of tensors, numbers, strings, lists and dicts. ``save`` writes
a temporary file in the same folder, flushes and fsyncs it, then renames it over the
target, so a run killed mid-write leaves the previous file whole. The file gets the
umask's permissions (0644 under the usual umask 022), like every other file of a run
directory, not the temporary file's private 0600.
"""
from __future__ import annotations

import os
import pickle
import tempfile
import zipfile
from pathlib import Path
from typing import Any, Callable

import torch

__all__ = ["CheckpointError", "atomic_write", "save", "load"]


class CheckpointError(ValueError):
    """A checkpoint that cannot be used; the message names the file and the reason."""


def atomic_write(path: str | Path, write: Callable[[Path], None]) -> Path:
    """Call ``write(tmp)`` on a temporary file beside ``path``, fsync it, rename it over
    ``path`` and fsync the folder. On any failure the temp file is removed and
    ``path`` keeps its previous content. The file gets ``0666`` minus the umask (what
    ``open(path, "w")`` gives a new file), not ``mkstemp``'s private 0600."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~_umask())
        _fsync(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync(path.parent)
    return path


def _umask() -> int:
    """The process umask, read without changing it where Linux reports it (os.umask can only
    be read by setting it, which races with other threads creating files)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save(obj: dict, path: str | Path) -> Path:
    """Write ``obj`` to ``path`` atomically (temp file, flush, fsync, rename)."""
    return atomic_write(path, lambda tmp: torch.save(obj, tmp))


def load(path: str | Path, kind: str | None = None) -> dict[str, Any]:
    """Read a checkpoint with ``weights_only=True``; ``kind`` checks its ``"kind"`` entry."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {str(path)!r} does not exist")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise CheckpointError(f"checkpoint {str(path)!r} carries a pickled object payload; "
                              "refusing to load it (only tensors and plain data are accepted)") from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError, ValueError, KeyError):
        raise CheckpointError(f"checkpoint {str(path)!r} is truncated or corrupted") from None
    if not isinstance(obj, dict) or "kind" not in obj:
        raise CheckpointError(f"checkpoint {str(path)!r} is not a spikegrad checkpoint")
    if kind is not None and obj["kind"] != kind:
        raise CheckpointError(f"checkpoint {str(path)!r} is a {obj['kind']!r} file, expected {kind!r}")
    return obj

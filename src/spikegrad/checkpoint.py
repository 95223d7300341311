"""Checkpoint and model files: written atomically, read only through ``weights_only=True``.

A checkpoint is a dict of tensors, numbers, strings, lists and dicts. ``save`` writes
a temporary file in the same folder, flushes and fsyncs it, then renames it over the
target, so a run killed mid-write leaves the previous file whole. The file gets the
umask's permissions (0644 under the usual umask 022), like every other file of a run
directory, not the temporary file's private 0600.

Two kinds: a run checkpoint (``kind: run``, ``last.pt``/``best.pt``: everything a resume
needs) and a model file (``kind: model``, ``model.pt`` and ``spikegrad export``: the
inference model alone). ``load_inference_model`` rebuilds the plain registry model from
either, without the run directory.

Every file carries ``checksum``: a BLAKE2b digest of everything else in it (each tensor's
dtype, shape and bytes, every key and plain value), checked on load, so a flipped byte
inside a tensor is refused with one line naming the file instead of loading silently.
A file whose contents do not have the expected types (``check_schema``) is refused the
same way: every problem of a file is a ``CheckpointError``.
"""
from __future__ import annotations

import hashlib
import math
import os
import pickle
import tempfile
import zipfile
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from . import __version__, losses
from .config import from_dict
from .losses import RateCE
from .models import create_model

__all__ = ["CheckpointError", "atomic_write", "save", "load", "model_file", "load_inference_model",
           "checksum", "check_schema", "remove_stale_temp_files"]


class CheckpointError(ValueError):
    """A checkpoint that cannot be used; the message names the file and the reason."""


def atomic_write(path: str | Path, write: Callable[[Path], None]) -> Path:
    """Call ``write(tmp)`` on a temporary file beside ``path``, fsync it, rename it over
    ``path`` and fsync the folder. On any failure the temp file is removed and
    ``path`` keeps its previous content. The file gets ``0666`` minus the umask (what
    ``open(path, "w")`` gives a new file), not ``mkstemp``'s private 0600."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.is_dir():
        raise IsADirectoryError(21, "is a directory", str(path))
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~_umask())
        _fsync(tmp)
        os.replace(tmp, path)
    except OSError as err:  # disk full, read-only, a directory in the way: name the target
        tmp.unlink(missing_ok=True)
        raise OSError(err.errno, err.strerror or str(err), str(path)) from None
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


def remove_stale_temp_files(folder: str | Path) -> list[Path]:
    """Remove the temp files ``atomic_write`` leaves when a process is killed mid-write
    (``.<name>.<random>.tmp``) directly in ``folder``; returns them. Call it only while no
    other process writes there (the trainer holds the run directory's lock)."""
    removed = []
    folder = Path(folder)
    if folder.is_dir():
        for stale in folder.glob(".*.tmp"):
            if stale.is_file() and not stale.is_symlink():
                stale.unlink(missing_ok=True)
                removed.append(stale)
    return removed


def _digest(obj: Any, hasher: Any) -> None:
    if isinstance(obj, torch.Tensor):
        t = obj.detach().cpu().contiguous()
        hasher.update(f"T{t.dtype}{tuple(t.shape)};".encode())
        if t.numel():
            hasher.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    elif isinstance(obj, dict):
        hasher.update(f"D{len(obj)};".encode())
        for key in sorted(obj, key=repr):
            hasher.update(repr(key).encode())
            _digest(obj[key], hasher)
    elif isinstance(obj, (list, tuple)):
        hasher.update(f"L{len(obj)};".encode())
        for item in obj:
            _digest(item, hasher)
    else:
        hasher.update(f"V{type(obj).__name__}:{obj!r};".encode())


def checksum(obj: dict) -> str:
    """The hex BLAKE2b digest of ``obj`` without its ``checksum`` entry (tensors by dtype,
    shape and bytes; dict keys sorted)."""
    hasher = hashlib.blake2b(digest_size=32)
    _digest({k: v for k, v in obj.items() if k != "checksum"}, hasher)
    return hasher.hexdigest()


def save(obj: dict, path: str | Path) -> Path:
    """Write ``obj`` with its ``checksum`` to ``path`` atomically (temp file, flush, fsync,
    rename)."""
    obj = {**{k: v for k, v in obj.items() if k != "checksum"}, "checksum": checksum(obj)}
    return atomic_write(path, lambda tmp: torch.save(obj, tmp))


def load(path: str | Path, kind: str | None = None) -> dict[str, Any]:
    """Read a checkpoint with ``weights_only=True`` and verify its checksum; ``kind`` checks
    its ``"kind"`` entry and its entries' types (``check_schema``)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {str(path)!r} does not exist")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise CheckpointError(f"checkpoint {str(path)!r} carries a pickled object payload; "
                              "refusing to load it (only tensors and plain data are accepted)") from None
    except IsADirectoryError:
        raise CheckpointError(f"checkpoint {str(path)!r} is a directory") from None
    except PermissionError:
        raise CheckpointError(f"checkpoint {str(path)!r} cannot be read (permission denied)") from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError, ValueError, KeyError, TypeError,
            AttributeError, IndexError, OverflowError, MemoryError, UnicodeDecodeError):
        raise CheckpointError(f"checkpoint {str(path)!r} is truncated or corrupted") from None
    if not isinstance(obj, dict) or "kind" not in obj:
        raise CheckpointError(f"checkpoint {str(path)!r} is not a spikegrad checkpoint")
    if "checksum" in obj:  # files written before checksums have none
        try:
            good = obj["checksum"] == checksum(obj)
        except (RuntimeError, TypeError, ValueError, RecursionError):
            good = False
        if not good:
            raise CheckpointError(f"checkpoint {str(path)!r} is corrupted: its contents do not match "
                                  "the checksum stored in it")
    if kind is not None and obj["kind"] != kind:
        raise CheckpointError(f"checkpoint {str(path)!r} is a {obj['kind']!r} file, expected {kind!r}")
    if kind is not None:
        check_schema(obj, path)
    return obj


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


_TENSOR_DICT = ("a dict of tensors", lambda v: isinstance(v, dict) and all(
    isinstance(k, str) and isinstance(t, torch.Tensor) for k, t in v.items()))
_SCHEMA: dict[str, dict[str, tuple[str, Callable[[Any], bool]]]] = {
    "model": {
        "model_name": ("a string", lambda v: isinstance(v, str)),
        "model_kwargs": ("a dict", lambda v: isinstance(v, dict) and all(isinstance(k, str) for k in v)),
        "state_dict": _TENSOR_DICT,
        "decoder": ("a dict with a 'name'", lambda v: isinstance(v, dict) and isinstance(v.get("name"), str)),
    },
    "run": {
        "config": ("a dict", lambda v: isinstance(v, dict)),
        "model_name": ("a string", lambda v: isinstance(v, str)),
        "model_kwargs": ("a dict", lambda v: isinstance(v, dict) and all(isinstance(k, str) for k in v)),
        "net": _TENSOR_DICT,
        "optimizer": ("a dict with 'state' and 'param_groups'", lambda v: isinstance(v, dict)
                      and isinstance(v.get("state"), dict) and isinstance(v.get("param_groups"), list)),
        "epoch": ("an integer >= 0", lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 0),
        "batch": ("an integer >= 0", lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 0),
        "step": ("an integer >= 0", lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 0),
        "best_acc": ("a number", lambda v: _is_number(v) and math.isfinite(v)),
        "history": ("a list of dicts", lambda v: isinstance(v, list) and all(isinstance(r, dict) for r in v)),
        "sums": ("a dict (empty, or loss, correct, seen, time, norms)", lambda v: isinstance(v, dict) and (
            not v or (all(_is_number(v.get(k)) for k in ("loss", "correct", "seen", "time"))
                      and isinstance(v.get("norms"), dict)))),
        "metrics_bytes": ("an integer >= 0", lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 0),
        "rng": ("a dict of RNG states (torch, python, numpy, cuda)", lambda v: _rng_ok(v)),
    },
}


def _rng_ok(state: Any) -> bool:
    try:
        python, numpy = state["python"], state["numpy"]
        return (isinstance(state["torch"], torch.Tensor) and state["torch"].dtype == torch.uint8
                and isinstance(python, list) and len(python) == 3 and isinstance(python[1], list)
                and isinstance(numpy, list) and len(numpy) == 5 and isinstance(numpy[1], torch.Tensor)
                and isinstance(state["cuda"], list))
    except (KeyError, TypeError, IndexError):
        return False


def check_schema(obj: dict, path: str | Path) -> None:
    """CheckpointError naming ``path`` and the entry unless ``obj`` has the entries its
    ``kind`` needs, of the right types (what a hand-edited or foreign file gets wrong)."""
    schema = _SCHEMA.get(obj.get("kind"))
    if schema is None:
        raise CheckpointError(f"checkpoint {str(path)!r} has kind {obj.get('kind')!r}, expected 'run' or 'model'")
    for key, (expected, ok) in schema.items():
        if key not in obj:
            if obj["kind"] == "run" and key in ("sums", "metrics_bytes", "rng"):
                continue  # files from earlier versions: eval and export still read them
            raise CheckpointError(f"checkpoint {str(path)!r} lacks its {key!r} entry")
        if not ok(obj[key]):
            raise CheckpointError(f"checkpoint {str(path)!r}: entry {key!r} must be {expected}")


def model_file(model: nn.Module, model_name: str, kwargs: dict, objective: RateCE) -> dict:
    """The inference-only model file (``kind: model``): what ``eval`` needs to rebuild
    ``model`` without its run directory, decoding state included."""
    return {"kind": "model", "version": __version__, "model_name": model_name, "model_kwargs": kwargs,
            "state_dict": model.state_dict(),
            "decoder": {"name": objective.name, **objective.state_dict()}}


def _model_state(state: dict, model: nn.Module) -> dict:
    """The model's own entries of a run checkpoint's ``net`` (its ``model_prefix`` stripped;
    the wrapper's extra modules, e.g. shortcut branches, left out)."""
    prefix = state.get("model_prefix")
    if prefix is None:  # files written before model_prefix: the prefix under which every key sits
        keys = set(model.state_dict())
        heads = {k.split(".", 1)[0] + "." for k in state["net"]}
        prefix = next((p for p in ["", *sorted(heads)] if {p + k for k in keys} <= set(state["net"])), "")
    return {k[len(prefix):]: v for k, v in state["net"].items() if k.startswith(prefix)
            and k[len(prefix):] in model.state_dict()}


def _run_decoder(state: dict) -> dict:
    """A run checkpoint's decoding state (the objective's)."""
    return state["callbacks"]["objective"] if "callbacks" in state else state["decoder"]


def load_inference_model(path: str | Path) -> tuple[nn.Module, RateCE, dict]:
    """``(model, objective, file)`` from a run checkpoint (``last.pt``/``best.pt``) or an
    exported model file; the model is the plain registry model in eval mode."""
    state = load(path)
    check_schema(state, path)
    try:
        model = create_model(state["model_name"], **state["model_kwargs"])
        T = state["model_kwargs"].get("T", 1)
        if state["kind"] == "run":
            objective = losses.from_config(from_dict(state["config"]).loss, T)
            model.load_state_dict(_model_state(state, model))
            objective.load_state_dict(_run_decoder(state))
        else:
            decoder = dict(state["decoder"])
            objective = losses.create(decoder.pop("name"), T)
            objective.load_state_dict(decoder)
            model.load_state_dict(state["state_dict"])
    except (KeyError, RuntimeError, TypeError, ValueError, IndexError, AttributeError, OverflowError) as err:
        # the file's contents drive every call above: any of these is the file's fault
        detail = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise CheckpointError(f"checkpoint {str(path)!r} does not match its model: {detail}") from None
    return model.eval(), objective, state

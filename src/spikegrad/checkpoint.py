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
"""
from __future__ import annotations

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

__all__ = ["CheckpointError", "atomic_write", "save", "load", "model_file", "load_inference_model"]


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
    except (KeyError, RuntimeError) as err:
        raise CheckpointError(f"checkpoint {str(path)!r} does not match its model: "
                              f"{str(err).splitlines()[0]}") from None
    return model.eval(), objective, state

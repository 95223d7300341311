"""CIFAR10-DVS from the official release: ``root/<class>/*.aedat``, framed on the fly.

The 10 class folders (airplane, automobile, bird, cat, deer, dog, frog, horse,
ship, truck) each hold ``cifar10_<class>_<i>.aedat``, i = 0..999. The release
has no train/test split; the one built in here: per class, files sorted by
their index i, the first 90 % train and the last 10 % test.

Items are ``[T, 2, size, size]`` float32 event counts (``aedat``, ``frames``);
``size`` defaults to the sensor's 128 (papers also use 48). The training recipe
(augment=True): horizontal flip and a roll of up to 5 pixels per 48 of ``size``.
``make_loader`` batches them time-first, ``[T, B, 2, size, size]``. With
``cache_dir``, framed samples are kept as ``.npy`` files under a folder named by
every framing parameter (T, framing mode, size) and the reader's version.
"""
from __future__ import annotations

import os
import re
from pathlib import Path

import numpy as np
import torch
from torch import Generator, Tensor

from .aedat import SENSOR_SIZE, read_aedat
from .augment import Augment, event_train
from .base import FileDataset
from .errors import DatasetError, locate
from .frames import events_to_frames, resize_frames
from .request import Request

__all__ = ["CLASSES", "EventFrames", "load", "split_files"]

CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
_SOURCE = ("the official release (Li et al. 2017) is on figshare: "
           "figshare.com/articles/dataset/CIFAR10-DVS_New/4724671, one zip per class, "
           "each unzipped into root/<class>/")
_CACHE_VERSION = 1


class EventFrames(FileDataset):
    """Event recordings framed into ``[T, 2, size, size]`` when read (or from the cache)."""

    def __init__(self, files: list[Path], labels: Tensor, *, T: int, frames: str, size: int,
                 cache_dir: Path | None = None, augment: Augment | None = None) -> None:
        super().__init__(files, labels, CLASSES, augment)
        self.T = T
        self.frames = frames
        self.size = size
        self.cache_dir = cache_dir

    def load(self, path: Path, generator: Generator | None, augment: Augment | None) -> Tensor:
        """``[T, 2, size, size]`` float32 event counts (augmented when ``augment`` is set)."""
        x = self._cached(path)
        return x if augment is None else augment(x.unsqueeze(0), generator)[0]

    def _frame(self, path: Path) -> Tensor:
        frames = events_to_frames(read_aedat(path), self.T, self.frames, SENSOR_SIZE)
        return resize_frames(frames, self.size)

    def cache_path(self, path: Path) -> Path | None:
        """Where ``path``'s frames are cached (None without a cache): the folder name holds
        every framing parameter, the file name the recording's name and byte size."""
        if self.cache_dir is None:
            return None
        try:
            nbytes = path.stat().st_size
        except OSError as err:
            raise DatasetError(f"{path}: cannot read ({err})") from err
        key = f"cifar10-dvs-v{_CACHE_VERSION}-T{self.T}-{self.frames}-{self.size}px"
        return self.cache_dir / key / path.parent.name / f"{path.stem}-{nbytes}.npy"

    def _cached(self, path: Path) -> Tensor:
        target = self.cache_path(path)
        if target is None:
            return self._frame(path)
        shape = (self.T, 2, self.size, self.size)
        try:
            stored = np.load(target, allow_pickle=False)
            if stored.shape == shape and stored.dtype == np.float32:
                return torch.from_numpy(stored)
        except (OSError, ValueError, EOFError):
            pass  # absent or unreadable: frame the recording again and rewrite it
        frames = self._frame(path)
        _save_atomically(target, frames.numpy())
        return frames


def _save_atomically(target: Path, array: np.ndarray) -> None:
    """Write ``array`` to ``target`` through a temporary file and a rename."""
    temporary = target.with_name(f"{target.name}.{os.getpid()}.tmp")
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        with open(temporary, "wb") as handle:
            np.save(handle, array)
        os.replace(temporary, target)
    except OSError as err:
        raise DatasetError(f"{target}: cannot write the frame cache ({err}); "
                           "choose a writable cache_dir") from err


def _order(path: Path) -> tuple[bool, int, str]:
    """Sort key: the trailing number of the file name (``cifar10_cat_12`` -> 12), then the name."""
    number = re.search(r"(\d+)$", path.stem)
    return number is None, int(number.group(1)) if number else 0, path.name


def split_files(files: list[Path], split: str) -> list[Path]:
    """One class's files of ``split``: sorted by index, the first 90 % train, the rest test."""
    ordered = sorted(files, key=_order)
    cut = len(ordered) * 9 // 10
    return ordered[:cut] if split == "train" else ordered[cut:]


def _class_folders(root: Path) -> Path | None:
    return root if any((root / name).is_dir() for name in CLASSES) else None


def load(request: Request) -> EventFrames:
    """The requested split of CIFAR10-DVS (file list now, frames per item)."""
    if request.T is None:
        raise DatasetError("cifar10-dvs: T, the number of frames (model.T), is required")
    root = locate("cifar10-dvs: <class>/*.aedat folders", request.places(), _class_folders, _SOURCE)
    missing = [name for name in CLASSES if not (root / name).is_dir()]
    if missing:
        raise DatasetError(f"{root}: missing class folders {', '.join(missing)}; expected "
                           f"root/<class>/*.aedat for all of {', '.join(CLASSES)}; {_SOURCE}")
    files: list[Path] = []
    labels: list[int] = []
    for label, name in enumerate(CLASSES):
        chosen = split_files(list((root / name).glob("*.aedat")), request.split)
        if not chosen:
            raise DatasetError(f"{root / name}: no .aedat files for the {request.split} split")
        files += chosen
        labels += [label] * len(chosen)
    size = request.size or SENSOR_SIZE
    recipe = request.recipe(lambda: event_train(max_shift=max(1, round(5 * size / 48))))
    return EventFrames(files, torch.tensor(labels), T=request.T, frames=request.frames, size=size,
                       cache_dir=request.cache_dir, augment=recipe)

"""The MNIST family (Fashion-MNIST, the embedded default; MNIST; KMNIST) from IDX files.

Files, gzipped or plain, in one folder: ``train-images-idx3-ubyte(.gz)``,
``train-labels-idx1-ubyte(.gz)``, ``t10k-images-idx3-ubyte(.gz)``,
``t10k-labels-idx1-ubyte(.gz)``. Loaded whole into memory as uint8
(Fashion-MNIST in well under two seconds). Items: ``[1, 28, 28]`` float32,
scaled to [0, 1] and normalised with the training set's mean and std below.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Callable, NamedTuple

import torch

from .augment import image_train
from .base import ImageTensorDataset, resize_images
from .errors import DatasetError, locate
from .idx import read_idx
from .request import Request

__all__ = ["FAMILY", "SYSTEM_ROOT", "LOCAL_ROOT", "embedded_places", "load"]

SYSTEM_ROOT = Path("/usr/share/datasets/fashion-mnist")
LOCAL_ROOT = Path(".data/usr/share/datasets/fashion-mnist")

_FILES = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
          "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}


class Family(NamedTuple):
    """Constants of one MNIST-family dataset (mean and std of the training pixels in [0, 1])."""

    mean: float
    std: float
    classes: tuple[str, ...]
    flip: bool  # horizontal flips keep the class (clothes yes, characters no)
    source: str


FAMILY = {
    "fashion-mnist": Family(0.2860, 0.3530, (
        "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker",
        "Bag", "Ankle boot"), True,
        "get the files with `apt-get install dataset-fashion-mnist` or `make data` "
        "(official release: github.com/zalandoresearch/fashion-mnist)"),
    "mnist": Family(0.1307, 0.3081, tuple("0123456789"), False,
                    "the official files come from yann.lecun.com/exdb/mnist"),
    "kmnist": Family(0.1918, 0.3483, ("o", "ki", "su", "tsu", "na", "ha", "ma", "ya", "re", "wo"),
                     False, "the official MNIST-format files come from github.com/rois-codh/kmnist"),
}


def embedded_places(root: Path | None) -> list[tuple[Path | None, str]]:
    """Fashion-MNIST's search order: root, else $SPIKEGRAD_DATA, the Debian package's
    folder, then ``.data/...`` under the current directory (where ``make data`` puts it)."""
    if root is not None:
        return [(root, "root")]
    env = os.environ.get("SPIKEGRAD_DATA")
    return [(Path(env), "$SPIKEGRAD_DATA") if env else (None, "$SPIKEGRAD_DATA (not set)"),
            (SYSTEM_ROOT, "Debian package dataset-fashion-mnist"),
            (Path.cwd() / LOCAL_ROOT, "make data")]


def _find(folder: Path, base: str) -> Path | None:
    for candidate in (folder / f"{base}.gz", folder / base):
        if candidate.is_file():
            return candidate
    return None


def _split_files(split: str) -> Callable[[Path], tuple[Path, Path] | None]:
    def probe(folder: Path) -> tuple[Path, Path] | None:
        images, labels = (_find(folder, base) for base in _FILES[split])
        return (images, labels) if images and labels else None
    return probe


def _read(images_path: Path, labels_path: Path, num_classes: int) -> tuple[torch.Tensor, torch.Tensor]:
    images, labels = read_idx(images_path), read_idx(labels_path)
    if images.ndim != 3 or images.dtype.kind != "u":
        raise DatasetError(f"{images_path}: expected uint8 images [N, H, W], "
                           f"got {images.dtype} {list(images.shape)}")
    if labels.ndim != 1 or len(labels) != len(images):
        raise DatasetError(f"{labels_path}: expected {len(images)} labels, got shape {list(labels.shape)}")
    if labels.dtype.kind not in "iu":
        raise DatasetError(f"{labels_path}: labels must be integers, got {labels.dtype}")
    if len(images) == 0:
        raise DatasetError(f"{images_path}: holds no images")
    low, high = int(labels.min()), int(labels.max())
    if low < 0 or high >= num_classes:
        bad = low if low < 0 else high
        raise DatasetError(f"{labels_path}: label {bad} out of range 0..{num_classes - 1}")
    return torch.from_numpy(images).unsqueeze(1), torch.from_numpy(labels).long()


def load(request: Request) -> ImageTensorDataset:
    """The requested MNIST-family split as an in-memory dataset."""
    family = FAMILY[request.name]
    places = embedded_places(request.root) if request.name == "fashion-mnist" else request.places()
    names = " and ".join(f"{base}(.gz)" for base in _FILES[request.split])
    images_path, labels_path = locate(f"{request.name}: {names}", places,
                                      _split_files(request.split), family.source)
    images, labels = _read(images_path, labels_path, len(family.classes))
    if request.size is not None:
        images = resize_images(images, request.size)
    recipe = request.recipe(lambda: image_train(
        size=tuple(images.shape[-2:]), padding=2, flip=family.flip,
        autoaugment=request.autoaugment, cutout=request.cutout, fill=family.mean))
    return ImageTensorDataset(images, labels, family.classes, (family.mean,), (family.std,), recipe)

"""``create_dataset(name, ...)`` and ``names()``: every dataset by its config name in
``DATASETS`` (``name -> loader(request) -> LabeledDataset``); register your own loader
with ``DATASETS.register("mydata", load)``."""
from __future__ import annotations

from pathlib import Path
from typing import Callable

from ..registry import Registry

from . import cifar, dvs, imagenet, mnist
from .augment import Augment
from .base import LabeledDataset, subset
from .errors import DatasetError
from .request import Request

__all__ = ["DATASETS", "create_dataset", "names"]

DATASETS: Registry[Callable[[Request], LabeledDataset]] = Registry("dataset")
for _name, _load in {"fashion-mnist": mnist.load, "mnist": mnist.load, "kmnist": mnist.load,
                     "cifar10": cifar.load, "cifar100": cifar.load, "imagenet": imagenet.load,
                     "cifar10-dvs": dvs.load}.items():
    DATASETS.register(_name, _load)


def _path(value: str | Path | None) -> Path | None:
    return None if value is None else Path(value).expanduser()


def names() -> list[str]:
    """The dataset names ``create_dataset`` accepts, sorted."""
    return DATASETS.names()


def create_dataset(
    name: str,
    root: str | Path | None = None,
    split: str = "train",
    *,
    T: int | None = None,
    frames: str = "count",
    size: int | None = None,
    augment: bool | Augment = False,
    autoaugment: bool = False,
    cutout: int = 0,
    limit: int | None = None,
    cache_dir: str | Path | None = None,
) -> LabeledDataset:
    """A dataset of ``(x, label)`` read from the official files under ``root``; never downloads.

    Images: ``x`` float32 ``[C, H, W]``, normalised with the dataset's mean and
    std. Event data (``cifar10-dvs``): ``x`` float32 ``[T, 2, H, W]`` event
    counts, ``T`` required, ``frames`` "count" (equal event counts) or "time"
    (equal durations); ``make_loader`` batches them ``[T, B, 2, H, W]``.
    ``root`` None: Fashion-MNIST searches ``$SPIKEGRAD_DATA``, then
    ``/usr/share/datasets/fashion-mnist``, then ``.data/usr/share/datasets/fashion-mnist``;
    the others look in ``.data/<name>``. ``split``: "train" or "test".
    ``size``: output side in pixels (images resized once at load, ImageNet
    crop, event frames area-resized). ``augment``: True for the dataset's
    standard training recipe (plus ``autoaugment``, ``cutout`` pixels), or a
    callable ``aug(x, generator)`` instead. ``limit``: keep the class-balanced
    first N items. ``cache_dir``: where event frames are cached. T and frames
    are ignored by image datasets. Missing or broken files raise DatasetError.
    """
    if name not in DATASETS:
        raise DatasetError(f"unknown dataset {name!r}; known: {', '.join(names())}")
    request = Request(name=name, root=_path(root), split=split, T=T, frames=frames, size=size,
                      augment=augment, autoaugment=autoaugment, cutout=cutout, limit=limit,
                      cache_dir=_path(cache_dir))
    dataset = DATASETS.get(name)(request)
    if len(dataset) == 0:
        raise DatasetError(f"{name}: the {split} split holds no items")
    return dataset if limit is None else subset(dataset, limit)

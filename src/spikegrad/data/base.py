"""What every spikegrad dataset shares: labels, classes, an optional training
augmentation, per-item access with an explicit generator, and class-balanced subsets.

Two kinds: ``ImageTensorDataset`` holds all images in memory as uint8 and
serves whole batches with one indexing operation (the loader's fast path);
``FileDataset`` decodes one file per item (ImageNet folders, event recordings).
Items are ``(x, label)`` with ``x`` float32: ``[C, H, W]`` images (normalised)
or ``[T, 2, H, W]`` event frames.
"""
from __future__ import annotations

import copy
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Generator, Tensor
from torch.utils.data import Dataset

from .augment import Augment, Normalize

__all__ = ["LabeledDataset", "ImageTensorDataset", "FileDataset", "subset", "balanced_indices",
           "resize_images"]


def _choose(override: Augment | bool | None, own: Augment | None) -> Augment | None:
    """The augmentation to run: ``override`` if callable, none if False, else ``own``."""
    if override is None:
        return own
    if override is False:
        return None
    if callable(override):
        return override
    raise TypeError(f"augment must be a callable, False or None, got {override!r}")


class LabeledDataset(Dataset):
    """A map-style dataset of ``(x, label)`` with every label known up front.

    Attributes: ``labels`` int64 ``[N]``, ``classes`` (names, index = label),
    ``augment`` (the training augmentation, or None). ``dataset[i]`` runs it
    with torch's default generator; ``make_loader`` passes explicit ones.
    """

    labels: Tensor
    classes: list[str]
    augment: Augment | None

    def __len__(self) -> int:
        return int(self.labels.numel())

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        return self.item(index)

    @property
    def num_classes(self) -> int:
        """Number of classes (the model's output size)."""
        return len(self.classes)

    def item(self, index: int, generator: Generator | None = None,
             augment: Augment | bool | None = None) -> tuple[Tensor, int]:
        """``(x, label)`` of item ``index``, augmented with randomness from ``generator``.

        ``augment``: None runs the dataset's own augmentation, False none, a
        callable that one instead.
        """
        raise NotImplementedError

    def select(self, indices: Tensor) -> "LabeledDataset":
        """A dataset of the same kind holding only ``indices`` (int64 ``[n]``), in that order."""
        raise NotImplementedError


class ImageTensorDataset(LabeledDataset):
    """Images held in memory: ``images`` uint8 ``[N, C, H, W]``, ``labels`` int64 ``[N]``.

    Items and batches are float32, scaled to [0, 1], augmented (on [0, 1]
    values), then normalised with the dataset's ``mean`` and ``std``.
    """

    def __init__(self, images: Tensor, labels: Tensor, classes: Sequence[str],
                 mean: Sequence[float], std: Sequence[float], augment: Augment | None = None) -> None:
        self.images = images
        self.labels = labels
        self.classes = list(classes)
        self.normalize = Normalize(mean, std)
        self.augment = augment

    def batch(self, indices: Tensor, generator: Generator | None = None,
              augment: Augment | bool | None = None) -> tuple[Tensor, Tensor]:
        """``(x [B, C, H, W] float32, y [B] int64)`` for ``indices`` ``[B]``, in one pass."""
        x = self.images[indices].float().div_(255)
        aug = _choose(augment, self.augment)
        if aug is not None:
            x = aug(x, generator)
        return self.normalize(x), self.labels[indices]

    def item(self, index: int, generator: Generator | None = None,
             augment: Augment | bool | None = None) -> tuple[Tensor, int]:
        x, y = self.batch(torch.tensor([index]), generator, augment)
        return x[0], int(y[0])

    def select(self, indices: Tensor) -> "ImageTensorDataset":
        return ImageTensorDataset(self.images[indices], self.labels[indices], self.classes,
                                  self.normalize.mean, self.normalize.std, self.augment)


class FileDataset(LabeledDataset):
    """One file per item: ``files[i]`` holds the sample of class ``labels[i]``.

    Subclasses implement ``load(path, generator, augment) -> x``.
    """

    def __init__(self, files: Sequence[Path], labels: Tensor, classes: Sequence[str],
                 augment: Augment | None = None) -> None:
        self.files = list(files)
        self.labels = labels
        self.classes = list(classes)
        self.augment = augment

    def load(self, path: Path, generator: Generator | None, augment: Augment | None) -> Tensor:
        """Decode ``path`` into ``x`` (float32), running ``augment`` when not None."""
        raise NotImplementedError

    def item(self, index: int, generator: Generator | None = None,
             augment: Augment | bool | None = None) -> tuple[Tensor, int]:
        x = self.load(self.files[index], generator, _choose(augment, self.augment))
        return x, int(self.labels[index])

    def select(self, indices: Tensor) -> "FileDataset":
        chosen = copy.copy(self)
        chosen.files = [self.files[i] for i in indices.tolist()]
        chosen.labels = self.labels[indices]
        return chosen


def balanced_indices(labels: Tensor, n: int) -> Tensor:
    """The first ``n`` indices taken round-robin over classes, in dataset order.

    The k-th item of every class comes before the (k+1)-th of any, so small
    subsets are as class-balanced as the data allows. Returns sorted int64 ``[min(n, N)]``.
    """
    order = torch.argsort(labels, stable=True)
    counts = torch.bincount(labels)
    first = counts.cumsum(0) - counts
    rank_in_class = torch.arange(len(labels)) - first[labels[order]]
    key = rank_in_class * len(counts) + labels[order]
    return order[torch.argsort(key)[:n]].sort().values


def subset(dataset: LabeledDataset, n: int) -> LabeledDataset:
    """The class-balanced first ``n`` items of ``dataset`` (all of it when ``n >= len``)."""
    if n < 1:
        raise ValueError(f"subset size must be at least 1, got {n}")
    return dataset.select(balanced_indices(dataset.labels, n))


def resize_images(images: Tensor, size: int) -> Tensor:
    """Resize uint8 ``[N, C, H, W]`` to ``[N, C, size, size]`` (bilinear, antialiased), uint8."""
    if images.shape[-2:] == (size, size):
        return images
    out = F.interpolate(images.float(), size=(size, size), mode="bilinear", antialias=True,
                        align_corners=False)
    return out.round_().clamp_(0, 255).to(torch.uint8)

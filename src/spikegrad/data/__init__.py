"""Datasets and batching: the embedded default (Fashion-MNIST), MNIST, KMNIST,
CIFAR-10/100, ImageNet folders and CIFAR10-DVS, all read from the official
files with our own readers (no torchvision, no tonic, no downloads).

    >>> train = create_dataset("fashion-mnist", split="train", augment=True)
    >>> x, label = train[0]                                   # [1, 28, 28], int
    >>> for x, y in make_loader(train, 64, shuffle=True, seed=0, epoch=0):
    ...     ...                                               # [64, 1, 28, 28], [64]
    >>> dvs = create_dataset("cifar10-dvs", "data/cifar10-dvs", T=10, size=48)
    >>> x, y = next(iter(make_loader(dvs, 8, shuffle=False)))  # [10, 8, 2, 48, 48]

Every data problem raises ``DatasetError`` (a ValueError) with a one-line
message naming the file or the places looked. Layouts and sources: docs/datasets.md.
"""
from . import augment
from .base import FileDataset, ImageTensorDataset, LabeledDataset, subset
from .errors import DatasetError
from .loader import BatchLoader, collate, make_loader
from .registry import DATASETS, create_dataset, names

__all__ = [
    "DATASETS", "create_dataset", "names", "make_loader", "collate", "subset", "DatasetError",
    "BatchLoader", "LabeledDataset", "ImageTensorDataset", "FileDataset", "augment",
]

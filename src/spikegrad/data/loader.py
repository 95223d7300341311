"""Batches for the trainer: an order and augmentation that are pure functions of
(seed, epoch, batch), sharded over ranks, resumable mid-epoch with no RNG state.

    >>> loader = make_loader(train_set, 64, shuffle=True, seed=0, epoch=3, start_batch=17)
    >>> for x, y in loader: ...      # the same batches 17.. an uninterrupted epoch 3 sees

Order: ``torch.randperm(N)`` from a generator seeded by (seed, epoch); ranks
take every ``world_size``-th index of it, padded by wrapping like
``DistributedSampler`` so all ranks get the same count. Augmentation: batch b
of rank r draws from a generator seeded by (seed, epoch, r, b) (in-memory
datasets, one call per batch) or by (seed, epoch, r, b, position) (per-item
datasets, so DataLoader workers change nothing). Batches: ``x`` ``[B, C, H, W]``
for images, ``[T, B, 2, H, W]`` for event frames; ``y`` int64 ``[B]``.
"""
from __future__ import annotations

import hashlib
import math
from typing import Iterator, Sequence

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from .augment import Augment
from .base import ImageTensorDataset, LabeledDataset

__all__ = ["make_loader", "BatchLoader", "collate", "epoch_order", "shard", "mix_seed"]


def mix_seed(*parts: int | str) -> int:
    """A 63-bit seed that depends on every part and nothing else (BLAKE2b of their text;
    integers of any type, e.g. numpy's, count by value)."""
    text = ",".join(part if isinstance(part, str) else str(int(part)) for part in parts)
    digest = hashlib.blake2b(text.encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def epoch_order(n: int, *, shuffle: bool, seed: int, epoch: int) -> Tensor:
    """The epoch's order of ``n`` indices, int64 ``[n]``: a permutation seeded by
    (seed, epoch) when ``shuffle``, else ``0..n-1``."""
    if not shuffle:
        return torch.arange(n)
    return torch.randperm(n, generator=torch.Generator().manual_seed(mix_seed("order", seed, epoch)))


def shard(order: Tensor, rank: int, world_size: int) -> Tensor:
    """Rank ``rank``'s share of ``order`` ``[n]``: pad by repeating from the start to a
    multiple of ``world_size``, then take every ``world_size``-th from ``rank``;
    int64 ``[ceil(n / world_size)]``."""
    total = math.ceil(len(order) / world_size) * world_size
    padded = order.repeat(math.ceil(total / len(order)))[:total]
    return padded[rank::world_size]


def collate(samples: Sequence[tuple[Tensor, int]]) -> tuple[Tensor, Tensor]:
    """Stack items into ``(x, y)``: images ``[C, H, W]`` -> ``[B, C, H, W]``; event frames
    ``[T, 2, H, W]`` -> ``[T, B, 2, H, W]`` (time first); labels -> int64 ``[B]``."""
    xs = [x for x, _ in samples]
    y = torch.tensor([int(label) for _, label in samples], dtype=torch.long)
    return torch.stack(xs, dim=1 if xs[0].dim() == 4 else 0), y


def _fetch(dataset: Dataset, index: int, seed: int, augment: Augment | bool | None) -> tuple[Tensor, int]:
    """One item with its own generator; plain datasets get only an explicit ``augment``."""
    generator = torch.Generator().manual_seed(seed)
    if isinstance(dataset, LabeledDataset):
        return dataset.item(index, generator, augment)
    x, label = dataset[index]
    if callable(augment):
        x = augment(x.unsqueeze(0), generator)[0]
    return x, int(label)


def _ignore_interrupt(worker_id: int) -> None:
    """DataLoader workers ignore Ctrl-C: the main process gets the KeyboardInterrupt, prints
    one line and stops them (instead of every worker printing its own traceback)."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)


class _SeededItems(Dataset):
    """A DataLoader view whose keys are ``(index, seed)`` pairs."""

    def __init__(self, dataset: Dataset, augment: Augment | bool | None) -> None:
        self.dataset = dataset
        self.augment = augment

    def __getitem__(self, key: tuple[int, int]) -> tuple[Tensor, int]:
        return _fetch(self.dataset, key[0], key[1], self.augment)

    def __len__(self) -> int:
        return len(self.dataset)


class BatchLoader:
    """Iterable over this rank's batches ``start_batch..num_batches-1`` of one epoch.

    ``len()`` is the number of batches it yields (``num_batches - start_batch``);
    ``num_batches`` is the whole epoch's count for this rank; ``indices`` the
    rank's dataset indices in epoch order. Iterating again yields the same batches.
    """

    def __init__(self, dataset: Dataset, batch_size: int, *, shuffle: bool, seed: int = 0,
                 epoch: int = 0, rank: int = 0, world_size: int = 1, drop_last: bool = False,
                 augment: Augment | bool | None = None, start_batch: int = 0,
                 num_workers: int = 0) -> None:
        n = len(dataset)
        if n < 1:
            raise ValueError("make_loader: the dataset is empty")
        if batch_size < 1 or world_size < 1 or not 0 <= rank < world_size or num_workers < 0:
            raise ValueError(f"make_loader: need batch_size >= 1, 0 <= rank < world_size, "
                             f"num_workers >= 0; got batch_size={batch_size}, rank={rank}, "
                             f"world_size={world_size}, num_workers={num_workers}")
        self.dataset = dataset
        self.batch_size = batch_size
        self.seed, self.epoch, self.rank = seed, epoch, rank
        self.augment = augment
        self.num_workers = num_workers
        self.indices = shard(epoch_order(n, shuffle=shuffle, seed=seed, epoch=epoch), rank, world_size)
        divide = math.floor if drop_last else math.ceil
        self.num_batches = divide(len(self.indices) / batch_size)
        if not 0 <= start_batch <= self.num_batches:
            raise ValueError(f"make_loader: start_batch must be in 0..{self.num_batches}, got {start_batch}")
        self.start_batch = start_batch

    def __len__(self) -> int:
        return self.num_batches - self.start_batch

    def batch_indices(self, b: int) -> Tensor:
        """Dataset indices of batch ``b``, int64 ``[B]``."""
        return self.indices[b * self.batch_size:(b + 1) * self.batch_size]

    def batch_seed(self, b: int, position: int | None = None) -> int:
        """Seed of batch ``b``'s augmentation (of its item at ``position`` if given)."""
        parts = ("augment", self.seed, self.epoch, self.rank, b)
        return mix_seed(*parts) if position is None else mix_seed(*parts, position)

    def _keys(self, b: int) -> list[tuple[int, int]]:
        return [(i, self.batch_seed(b, j)) for j, i in enumerate(self.batch_indices(b).tolist())]

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        batches = range(self.start_batch, self.num_batches)
        if isinstance(self.dataset, ImageTensorDataset):
            for b in batches:
                generator = torch.Generator().manual_seed(self.batch_seed(b))
                yield self.dataset.batch(self.batch_indices(b), generator, self.augment)
        elif self.num_workers == 0:
            for b in batches:
                yield collate([_fetch(self.dataset, i, s, self.augment) for i, s in self._keys(b)])
        else:
            yield from DataLoader(_SeededItems(self.dataset, self.augment),
                                  batch_sampler=[self._keys(b) for b in batches],
                                  num_workers=self.num_workers, collate_fn=collate,
                                  worker_init_fn=_ignore_interrupt)


def make_loader(dataset: Dataset, batch_size: int, *, shuffle: bool, seed: int = 0, epoch: int = 0,
                rank: int = 0, world_size: int = 1, drop_last: bool = False,
                augment: Augment | bool | None = None, start_batch: int = 0,
                num_workers: int = 0) -> BatchLoader:
    """The batches of one epoch for one rank (see the module docstring).

    ``augment``: None runs the dataset's own training augmentation (from
    ``create_dataset(augment=True)``), False none, a callable that one instead.
    ``drop_last`` drops this rank's last incomplete batch. ``start_batch``
    resumes mid-epoch. ``num_workers`` > 0 decodes per-item datasets in
    DataLoader worker processes (same batches, same order); in-memory datasets
    are always served by one indexing operation per batch.
    """
    return BatchLoader(dataset, batch_size, shuffle=shuffle, seed=seed, epoch=epoch, rank=rank,
                       world_size=world_size, drop_last=drop_last, augment=augment,
                       start_batch=start_batch, num_workers=num_workers)

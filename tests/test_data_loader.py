"""make_loader: order and augmentation are pure functions of (seed, epoch, batch), so a
run resumed mid-epoch sees the same batches; ranks split every epoch like DistributedSampler."""
from pathlib import Path

import pytest
import torch
from torch.utils.data import TensorDataset

from spikegrad.data import FileDataset, ImageTensorDataset, collate, make_loader
from spikegrad.data.augment import image_train
from spikegrad.data.loader import epoch_order, shard


def indexed_images(n: int = 50, augment: bool = True) -> ImageTensorDataset:
    """Image i is filled with the value i (so a batch tells which items it holds)."""
    images = torch.arange(n, dtype=torch.uint8).reshape(n, 1, 1, 1).expand(n, 1, 8, 8).clone()
    recipe = image_train(size=(8, 8), padding=2, cutout=3) if augment else None
    return ImageTensorDataset(images, torch.arange(n) % 5, list("abcde"), (0.0,), (1 / 255,), recipe)


def ids(x: torch.Tensor) -> torch.Tensor:
    """Which items an unaugmented image batch holds."""
    return x[:, 0, 0, 0].round().long()


class IndexedFiles(FileDataset):
    """A per-item dataset: item i is a [2, 2, 4, 4] frame stack of value i, optionally augmented."""

    def load(self, path: Path, generator, augment):
        x = torch.full((2, 2, 4, 4), float(path.name))
        x[0, 0, 0, 0] = -1.0  # asymmetric, so flips show
        return x if augment is None else augment(x.unsqueeze(0), generator)[0]


def indexed_files(n: int = 23) -> IndexedFiles:
    return IndexedFiles([Path(str(i)) for i in range(n)], torch.arange(n) % 3, ["a", "b", "c"],
                        augment=image_train(size=(4, 4), padding=1))


def batches(loader):
    return [(x.clone(), y.clone()) for x, y in loader]


def assert_same(a, b):
    assert len(a) == len(b)
    for (xa, ya), (xb, yb) in zip(a, b):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)


def test_in_memory_batches_are_deterministic():
    data = indexed_images()
    first = batches(make_loader(data, 8, shuffle=True, seed=3, epoch=2))
    assert_same(first, batches(make_loader(data, 8, shuffle=True, seed=3, epoch=2)))
    x, y = first[0]
    assert x.shape == (8, 1, 8, 8) and x.dtype == torch.float32 and y.dtype == torch.long
    other = batches(make_loader(data, 8, shuffle=True, seed=3, epoch=3))
    assert not torch.equal(first[0][1], other[0][1])


def test_order_is_a_permutation_and_unshuffled_is_identity():
    order = epoch_order(50, shuffle=True, seed=0, epoch=0)
    assert sorted(order.tolist()) == list(range(50)) and order.tolist() != list(range(50))
    loader = make_loader(indexed_images(augment=False), 7, shuffle=False)
    seen = torch.cat([ids(x) for x, _ in loader])
    assert seen.tolist() == list(range(50)) and len(loader) == 8 == loader.num_batches


@pytest.mark.parametrize("dataset", [indexed_images, indexed_files], ids=["in-memory", "per-item"])
def test_resume_mid_epoch_sees_the_same_batches(dataset):
    data = dataset()
    full = batches(make_loader(data, 4, shuffle=True, seed=7, epoch=1))
    resumed = make_loader(data, 4, shuffle=True, seed=7, epoch=1, start_batch=3)
    assert len(resumed) == len(full) - 3
    assert_same(batches(resumed), full[3:])


def test_augmentation_differs_between_batches_and_can_be_overridden():
    data = indexed_images()
    loader = make_loader(data, 50, shuffle=False)
    (augmented, _), = batches(loader)
    (plain, _), = batches(make_loader(data, 50, shuffle=False, augment=False))
    assert ids(plain).tolist() == list(range(50))
    assert not torch.equal(augmented, plain)
    flip_all = lambda x, g: x.flip(-1)  # noqa: E731
    (flipped, _), = batches(make_loader(data, 50, shuffle=False, augment=flip_all))
    assert torch.equal(flipped, plain.flip(-1))


@pytest.mark.parametrize("n,world", [(10, 3), (23, 4), (8, 2)])
def test_ranks_cover_the_epoch(n, world):
    order = epoch_order(n, shuffle=True, seed=1, epoch=5)
    shares = [make_loader(indexed_images(n, augment=False), 3, shuffle=True, seed=1, epoch=5,
                          rank=r, world_size=world) for r in range(world)]
    per_rank = [torch.cat([ids(x) for x, _ in loader]) for loader in shares]
    assert len({len(seen) for seen in per_rank}) == 1
    assert set(torch.cat(per_rank).tolist()) == set(range(n))
    assert torch.equal(torch.stack(per_rank, 1).flatten()[:n], order)  # rank r holds every world-th
    assert torch.equal(shard(order, 0, world), shares[0].indices)


def test_drop_last():
    loader = make_loader(indexed_images(10, augment=False), 4, shuffle=False, drop_last=True)
    assert len(loader) == 2 and [len(y) for _, y in loader] == [4, 4]


def test_workers_give_the_same_batches():
    data = indexed_files()
    serial = batches(make_loader(data, 5, shuffle=True, seed=2, epoch=0))
    parallel = batches(make_loader(data, 5, shuffle=True, seed=2, epoch=0, num_workers=2))
    assert_same(serial, parallel)
    x, y = serial[0]
    assert x.shape == (2, 5, 2, 4, 4)  # time first: [T, B, 2, H, W]


def test_collate_and_plain_datasets():
    frames = [(torch.full((3, 2, 4, 4), float(i)), i) for i in range(2)]
    x, y = collate(frames)
    assert x.shape == (3, 2, 2, 4, 4) and torch.equal(x[:, 1], frames[1][0]) and y.tolist() == [0, 1]
    plain = TensorDataset(torch.rand(6, 3, 4, 4), torch.arange(6))
    (x, y), = batches(make_loader(plain, 6, shuffle=False))
    assert torch.equal(x, plain.tensors[0]) and y.tolist() == list(range(6))


@pytest.mark.parametrize("kwargs", [
    {"batch_size": 0}, {"rank": 2, "world_size": 2}, {"start_batch": 99}, {"num_workers": -1},
])
def test_bad_arguments(kwargs):
    args = {"batch_size": 4, **kwargs}
    with pytest.raises(ValueError):
        make_loader(indexed_images(10), args.pop("batch_size"), shuffle=False, **args)

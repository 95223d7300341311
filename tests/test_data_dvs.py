"""CIFAR10-DVS from tiny recordings in the official jAER AEDAT 2.0 format, written here."""
from pathlib import Path

import numpy as np
import pytest
import torch

from spikegrad.data import DatasetError, create_dataset, make_loader
from spikegrad.data import dvs as dvs_module
from spikegrad.data.aedat import read_aedat
from spikegrad.data.dvs import CLASSES
from spikegrad.data.frames import events_to_frames, resize_frames

HEADER = (b"#!AER-DAT2.0\r\n# This is a raw AE data file - do not edit\r\n"
          b"# Data format is int32 address, int32 timestamp (8 bytes total)\r\n")


def write_aedat(path: Path, x, y, p, t, special=(), header: bytes = HEADER) -> None:
    """jAER DVS128 records: address = y << 8 | x << 1 | p, then the timestamp, big-endian;
    ``special`` lists record positions turned into sync events (bit 15 set)."""
    address = (np.asarray(y) << 8) | (np.asarray(x) << 1) | np.asarray(p)
    address[list(special)] |= 0x8000
    records = np.stack([address, np.asarray(t)], axis=1).astype(">u4")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(header + records.tobytes())


def random_recording(path: Path, rng, n: int = 60) -> None:
    write_aedat(path, rng.integers(0, 128, n), rng.integers(0, 128, n), rng.integers(0, 2, n),
                np.sort(rng.integers(0, 100000, n)))


@pytest.fixture(scope="module")
def dvs_root(tmp_path_factory):
    """10 classes x 11 recordings named cifar10_<class>_<i>.aedat, i = 0..10."""
    root = tmp_path_factory.mktemp("cifar10-dvs")
    rng = np.random.default_rng(0)
    for name in CLASSES:
        for i in range(11):
            random_recording(root / name / f"cifar10_{name}_{i}.aedat", rng)
    return root


def test_decoding_follows_the_dvs128_layout(tmp_path):
    path = tmp_path / "r.aedat"
    write_aedat(path, x=[0, 5, 127, 9], y=[0, 7, 3, 9], p=[1, 0, 1, 1], t=[10, 20, 30, 40], special=[3])
    events = read_aedat(path)
    assert events.t.tolist() == [10, 20, 30]
    assert events.row.tolist() == [127, 122, 0]  # 127 - x
    assert events.col.tolist() == [127, 120, 124]  # 127 - y
    assert events.channel.tolist() == [0, 1, 0]  # 1 - polarity bit


def test_frames_by_count_and_by_time(tmp_path):
    path = tmp_path / "r.aedat"
    # 6 events at one pixel: timestamps crowd the start, so the two framings differ
    write_aedat(path, x=[127] * 6, y=[127] * 6, p=[1, 1, 0, 1, 1, 1], t=[0, 1, 2, 3, 4, 100])
    events = read_aedat(path)
    by_count = events_to_frames(events, 3, "count")
    by_time = events_to_frames(events, 3, "time")
    assert by_count.shape == (3, 2, 128, 128) and by_count.dtype == torch.float32
    assert by_count[:, :, 0, 0].tolist() == [[2, 0], [1, 1], [2, 0]]
    assert by_time[:, :, 0, 0].tolist() == [[4, 1], [0, 0], [1, 0]]
    assert by_count.sum() == by_time.sum() == 6


def test_split_shapes_and_labels(dvs_root):
    train = create_dataset("cifar10-dvs", dvs_root, "train", T=4)
    test = create_dataset("cifar10-dvs", dvs_root, "test", T=4)
    assert (len(train), len(test), train.num_classes) == (90, 20, 10)
    assert [f.name for f in test.files[:2]] == ["cifar10_airplane_9.aedat", "cifar10_airplane_10.aedat"]
    assert test.labels.tolist() == [k // 2 for k in range(20)]
    x, label = train[12]
    assert x.shape == (4, 2, 128, 128) and x.dtype == torch.float32 and label == 1
    assert x.sum() == 60 and x.min() >= 0


def test_resize_to_48_averages_areas(dvs_root):
    small = create_dataset("cifar10-dvs", dvs_root, "test", T=2, size=48)[0][0]
    assert small.shape == (2, 2, 48, 48) and small.min() >= 0 and small.sum() > 0
    uniform = resize_frames(torch.full((2, 2, 128, 128), 3.0), 48)
    torch.testing.assert_close(uniform, torch.full((2, 2, 48, 48), 3.0))


def test_batches_are_time_first_and_augmentation_is_reproducible(dvs_root):
    train = create_dataset("cifar10-dvs", dvs_root, "train", T=3, size=48, augment=True, limit=10)
    assert sorted(train.labels.tolist()) == list(range(10))
    batches = [list(make_loader(train, 4, shuffle=True, seed=1, epoch=0)) for _ in range(2)]
    x, y = batches[0][0]
    assert x.shape == (3, 4, 2, 48, 48) and y.shape == (4,) and y.dtype == torch.long
    for (xa, ya), (xb, yb) in zip(*batches):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)


def test_frame_cache_is_keyed_by_framing(dvs_root, tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    first = create_dataset("cifar10-dvs", dvs_root, "test", T=3, size=48, cache_dir=cache)
    expected = first[5][0]
    assert [p.name for p in cache.iterdir()] == ["cifar10-dvs-v1-T3-count-48px"]
    monkeypatch.setattr(dvs_module, "read_aedat", lambda path: pytest.fail("cache not used"))
    again = create_dataset("cifar10-dvs", dvs_root, "test", T=3, size=48, cache_dir=cache)
    assert torch.equal(again[5][0], expected)
    monkeypatch.undo()
    create_dataset("cifar10-dvs", dvs_root, "test", T=3, frames="time", size=48, cache_dir=cache)[5]
    assert len(list(cache.iterdir())) == 2


def test_damaged_cache_entry_is_rebuilt(dvs_root, tmp_path):
    data = create_dataset("cifar10-dvs", dvs_root, "test", T=2, size=16, cache_dir=tmp_path)
    expected = data[0][0]
    entry = data.cache_path(data.files[0])
    entry.write_bytes(entry.read_bytes()[:40])
    assert torch.equal(data[0][0], expected)


@pytest.mark.parametrize("content,match", [
    (HEADER + b"\x00" * 13, "truncated"),
    (b"\x00" * 16, "not an AEDAT file"),
    (b"#!AER-DAT3.1\r\n#!END-HEADER\r\n", "AEDAT 3.1 is not supported"),
    (HEADER, "no events"),
], ids=["truncated", "no-header", "aedat3", "empty"])
def test_damaged_recording_is_named(dvs_root, tmp_path, content, match):
    path = tmp_path / "airplane" / "cifar10_airplane_0.aedat"
    path.parent.mkdir()
    path.write_bytes(content)
    with pytest.raises(DatasetError, match=match) as err:
        read_aedat(path)
    assert str(path) in str(err.value) and "\n" not in str(err.value)


def test_missing_layout_is_explained(dvs_root, tmp_path):
    with pytest.raises(DatasetError, match="figshare") as err:
        create_dataset("cifar10-dvs", tmp_path, T=4)
    assert str(tmp_path) in str(err.value)
    (tmp_path / "airplane").mkdir()
    with pytest.raises(DatasetError, match="missing class folders automobile, bird"):
        create_dataset("cifar10-dvs", tmp_path, T=4)
    with pytest.raises(DatasetError, match="T, the number of frames"):
        create_dataset("cifar10-dvs", dvs_root)

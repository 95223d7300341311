"""Image datasets read from tiny files in the real formats: IDX (MNIST family),
CIFAR python pickles (folder and tar.gz), ImageNet JPEG folders; errors name the file."""
import gzip
import pickle
import struct
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from spikegrad.data import DatasetError, ImageTensorDataset, create_dataset, mnist, names
from spikegrad.data.base import balanced_indices

FMNIST = Path("/usr/share/datasets/fashion-mnist")
# the tiny CIFAR files written here are not the official ones (tested once below)
pytestmark = pytest.mark.filterwarnings("ignore:.*differs from the official release")


# ---------------------------------------------------------------- IDX / MNIST family

def idx_bytes(array: np.ndarray) -> bytes:
    code = {np.uint8: 0x08, np.int32: 0x0C}[array.dtype.type]
    header = bytes([0, 0, code, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    return header + array.astype(array.dtype.newbyteorder(">")).tobytes()


def write_idx_split(root: Path, prefix: str, images: np.ndarray, labels: np.ndarray, gz: bool):
    root.mkdir(parents=True, exist_ok=True)
    for kind, array in (("images-idx3-ubyte", images), ("labels-idx1-ubyte", labels)):
        data = idx_bytes(array)
        name = f"{prefix}-{kind}"
        if gz:
            (root / f"{name}.gz").write_bytes(gzip.compress(data))
        else:
            (root / name).write_bytes(data)


@pytest.fixture
def idx_root(tmp_path):
    """30 train images gzipped, 10 test images plain; label i % 10."""
    rng = np.random.default_rng(0)
    root = tmp_path / "mnist"
    write_idx_split(root, "train", rng.integers(0, 256, (30, 28, 28), dtype=np.uint8),
                    (np.arange(30) % 10).astype(np.uint8), gz=True)
    write_idx_split(root, "t10k", rng.integers(0, 256, (10, 28, 28), dtype=np.uint8),
                    np.arange(10).astype(np.uint8), gz=False)
    return root


@pytest.mark.parametrize("name", ["mnist", "kmnist", "fashion-mnist"])
def test_idx_gz_and_plain(idx_root, name):
    family = mnist.FAMILY[name]
    train = create_dataset(name, idx_root, "train")
    test = create_dataset(name, idx_root, "test")
    assert (len(train), len(test), train.num_classes) == (30, 10, 10)
    x, label = train[3]
    assert x.shape == (1, 28, 28) and x.dtype == torch.float32 and label == 3
    raw = train.images[3].float() / 255
    torch.testing.assert_close(x, (raw - family.mean) / family.std)
    assert train.images.dtype == torch.uint8
    assert [test[i][1] for i in range(10)] == list(range(10))


def test_idx_resize(idx_root):
    x, _ = create_dataset("mnist", idx_root, size=32)[0]
    assert x.shape == (1, 32, 32)


@pytest.mark.parametrize("damage", ["truncate", "magic", "gzip"])
def test_idx_damaged_file_is_named(idx_root, damage):
    path = idx_root / "train-images-idx3-ubyte.gz"
    data = gzip.decompress(path.read_bytes())
    if damage == "truncate":
        path.write_bytes(gzip.compress(data[:-100]))
    elif damage == "magic":
        path.write_bytes(gzip.compress(b"\x12\x34" + data[2:]))
    else:
        path.write_bytes(path.read_bytes()[:50])
    with pytest.raises(DatasetError, match="train-images-idx3-ubyte.gz") as err:
        create_dataset("mnist", idx_root)
    assert "\n" not in str(err.value)


def test_fashion_mnist_missing_lists_every_place(tmp_path, monkeypatch):
    monkeypatch.delenv("SPIKEGRAD_DATA", raising=False)
    monkeypatch.setattr(mnist, "SYSTEM_ROOT", tmp_path / "system")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(DatasetError) as err:
        create_dataset("fashion-mnist")
    message = str(err.value)
    for part in ("$SPIKEGRAD_DATA (not set)", str(tmp_path / "system"),
                 str(tmp_path / ".data/usr/share/datasets/fashion-mnist"),
                 "apt-get install dataset-fashion-mnist", "make data"):
        assert part in message
    assert "\n" not in message


def test_fashion_mnist_from_env(idx_root, monkeypatch):
    monkeypatch.setenv("SPIKEGRAD_DATA", str(idx_root))
    assert len(create_dataset("fashion-mnist", split="test")) == 10


def test_missing_root_names_it(tmp_path):
    with pytest.raises(DatasetError, match=str(tmp_path / "nowhere")):
        create_dataset("mnist", tmp_path / "nowhere")


def test_limit_is_class_balanced(idx_root):
    small = create_dataset("mnist", idx_root, limit=12)
    assert len(small) == 12
    assert sorted(small.labels.tolist()) == sorted(list(range(10)) + [0, 1])
    labels = torch.tensor([0, 0, 0, 1, 2, 2])
    assert balanced_indices(labels, 4).tolist() == [0, 1, 3, 4]


def test_bad_arguments():
    with pytest.raises(DatasetError, match="unknown dataset 'svhn'"):
        create_dataset("svhn")
    with pytest.raises(DatasetError, match="split"):
        create_dataset("mnist", "x", split="val")
    with pytest.raises(DatasetError, match="augment=True"):
        create_dataset("mnist", "x", cutout=8)
    assert {"fashion-mnist", "cifar10", "cifar100", "imagenet", "cifar10-dvs"} <= set(names())


@pytest.mark.skipif(not FMNIST.is_dir(), reason="dataset-fashion-mnist not installed (make data)")
def test_real_fashion_mnist():
    start = time.perf_counter()
    train = create_dataset("fashion-mnist", FMNIST, "train")
    elapsed = time.perf_counter() - start
    test = create_dataset("fashion-mnist", FMNIST, "test")
    assert isinstance(train, ImageTensorDataset)
    assert (len(train), len(test), train.num_classes) == (60000, 10000, 10)
    assert train.images.shape == (60000, 1, 28, 28)
    assert torch.bincount(train.labels).tolist() == [6000] * 10
    pixels = train.images.float() / 255
    assert abs(pixels.mean().item() - 0.2860) < 1e-3 and abs(pixels.std().item() - 0.3530) < 1e-3
    assert elapsed < 10


# ---------------------------------------------------------------- CIFAR

def cifar_pickle(obj) -> bytes:
    return pickle.dumps(obj, protocol=2)


def write_cifar10(folder: Path, rng) -> None:
    """5 training batches of 4 images (20), a test batch of 4, the meta file."""
    folder.mkdir(parents=True)
    names_ = [n.encode() for n in ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog",
                                   "horse", "ship", "truck")]
    (folder / "batches.meta").write_bytes(cifar_pickle({b"label_names": names_, b"num_vis": 3072}))
    for i, member in enumerate([f"data_batch_{k}" for k in range(1, 6)] + ["test_batch"]):
        batch = {b"batch_label": member.encode(), b"labels": [(4 * i + j) % 10 for j in range(4)],
                 b"data": rng.integers(0, 256, (4, 3072), dtype=np.uint8),
                 b"filenames": [f"{member}_{j}.png".encode() for j in range(4)]}
        (folder / member).write_bytes(cifar_pickle(batch))


@pytest.fixture
def cifar_roots(tmp_path):
    """The same tiny CIFAR-10 as an extracted folder and as a tar.gz."""
    extracted = tmp_path / "extracted"
    write_cifar10(extracted / "cifar-10-batches-py", np.random.default_rng(1))
    archived = tmp_path / "archived"
    archived.mkdir()
    with tarfile.open(archived / "cifar-10-python.tar.gz", "w:gz") as tar:
        tar.add(extracted / "cifar-10-batches-py", arcname="cifar-10-batches-py")
    return extracted, archived


def test_cifar10_folder_and_archive_agree(cifar_roots):
    extracted, archived = cifar_roots
    a = create_dataset("cifar10", extracted, "train")
    b = create_dataset("cifar10", archived, "train")
    c = create_dataset("cifar10", extracted / "cifar-10-batches-py", "train")
    assert len(a) == 20 and a.classes[0] == "airplane"
    assert torch.equal(a.images, b.images) and torch.equal(a.images, c.images)
    assert a.labels.tolist() == [i % 10 for i in range(20)]
    x, label = a[5]
    assert x.shape == (3, 32, 32) and label == 5
    mean, std = torch.tensor(a.normalize.mean), torch.tensor(a.normalize.std)
    torch.testing.assert_close(x * std[:, None, None] + mean[:, None, None], a.images[5].float() / 255)
    assert len(create_dataset("cifar10", archived, "test")) == 4


def test_cifar_files_are_checked_against_the_official_md5(cifar_roots):
    extracted, _ = cifar_roots
    with pytest.warns(UserWarning, match="data_batch_1: MD5 .* differs from the official release's "
                                         "c99cafc152244af753f735de768cd75f"):
        create_dataset("cifar10", extracted)


def test_cifar100(tmp_path):
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    rng = np.random.default_rng(2)
    fine = [f"class{i}".encode() for i in range(100)]
    (folder / "meta").write_bytes(cifar_pickle({b"fine_label_names": fine, b"coarse_label_names": []}))
    for member, n in (("train", 6), ("test", 3)):
        (folder / member).write_bytes(cifar_pickle({
            b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
            b"fine_labels": list(range(90, 90 + n)), b"coarse_labels": [0] * n}))
    train = create_dataset("cifar100", tmp_path, "train")
    assert (len(train), train.num_classes, train[2][1]) == (6, 100, 92)


class _Evil:
    def __reduce__(self):
        return (print, ("this must never run",))


@pytest.mark.parametrize("content,match", [
    (cifar_pickle(_Evil()), "refusing to load __builtin__.print"),
    (cifar_pickle([1, 2, 3]), "expected a dict"),
    (cifar_pickle({b"data": np.zeros((2, 3072), np.uint8)}), "expected a dict"),
    (cifar_pickle({b"data": np.zeros((2, 10), np.uint8), b"labels": [0, 1]}), "uint8"),
    (b"\x80\x02}q\x00(U\x04data", "not a readable CIFAR pickle"),
], ids=["code", "list", "no-labels", "bad-data", "truncated"])
def test_cifar_bad_pickle_is_refused_and_named(cifar_roots, content, match, capsys):
    extracted, _ = cifar_roots
    path = extracted / "cifar-10-batches-py" / "data_batch_3"
    path.write_bytes(content)
    with pytest.raises(DatasetError, match=match) as err:
        create_dataset("cifar10", extracted)
    assert str(path) in str(err.value)
    assert "never run" not in capsys.readouterr().out


def test_cifar_truncated_archive_is_named(cifar_roots):
    _, archived = cifar_roots
    path = archived / "cifar-10-python.tar.gz"
    path.write_bytes(path.read_bytes()[:-200])
    with pytest.raises(DatasetError, match="cifar-10-python.tar.gz"):
        create_dataset("cifar10", archived)


def test_cifar_missing_says_where_files_come_from(tmp_path):
    with pytest.raises(DatasetError) as err:
        create_dataset("cifar10", tmp_path)
    assert str(tmp_path) in str(err.value) and "cs.toronto.edu/~kriz/cifar.html" in str(err.value)


# ---------------------------------------------------------------- ImageNet folders

@pytest.fixture
def imagenet_root(tmp_path):
    """3 classes x 2 JPEGs in train/ and val/, of assorted sizes."""
    rng = np.random.default_rng(3)
    for split in ("train", "val"):
        for wnid in ("n03", "n01", "n02"):
            folder = tmp_path / split / wnid
            folder.mkdir(parents=True)
            for k, (h, w) in enumerate([(40, 56), (72, 48)]):
                pixels = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(folder / f"{wnid}_{k}.JPEG", quality=90)
    return tmp_path


def test_imagenet_eval_is_deterministic(imagenet_root):
    test = create_dataset("imagenet", imagenet_root, "test", size=32)
    assert test.classes == ["n01", "n02", "n03"] and test.labels.tolist() == [0, 0, 1, 1, 2, 2]
    x, label = test[4]
    assert x.shape == (3, 32, 32) and x.dtype == torch.float32 and label == 2
    assert torch.equal(x, test[4][0])
    assert test.files[4].parent.name == "n03"


def test_imagenet_train_augmentation_follows_generator(imagenet_root):
    train = create_dataset("imagenet", imagenet_root, "train", size=32, augment=True)
    draw = [train.item(1, torch.Generator().manual_seed(s))[0] for s in (5, 5, 6)]
    assert draw[0].shape == (3, 32, 32)
    assert torch.equal(draw[0], draw[1]) and not torch.equal(draw[0], draw[2])


def test_imagenet_corrupt_jpeg_is_named(imagenet_root):
    bad = imagenet_root / "val" / "n02" / "n02_0.JPEG"
    bad.write_bytes(bad.read_bytes()[:20])
    test = create_dataset("imagenet", imagenet_root, "test", size=32)
    with pytest.raises(DatasetError, match="n02_0.JPEG"):
        test[2]


def test_imagenet_missing_split_folder(tmp_path):
    (tmp_path / "train").mkdir()
    with pytest.raises(DatasetError, match=r"val/<wnid>/\*\.JPEG"):
        create_dataset("imagenet", tmp_path, "test")


def test_imagenet_jpeg_roundtrip_values(imagenet_root):
    """A centre crop of a uniform image is that colour, normalised."""
    folder = imagenet_root / "val" / "n01"
    Image.new("RGB", (64, 64), (255, 0, 128)).save(folder / "n01_0.JPEG", quality=100)
    x, _ = create_dataset("imagenet", imagenet_root, "test", size=32)[0]
    mean, std = torch.tensor([0.485, 0.456, 0.406]), torch.tensor([0.229, 0.224, 0.225])
    rgb = (x * std[:, None, None] + mean[:, None, None]).mean(dim=(1, 2))
    torch.testing.assert_close(rgb, torch.tensor([1.0, 0.0, 0.5]), atol=0.02, rtol=0)


def test_imagenet_no_images(tmp_path):
    (tmp_path / "val" / "n01").mkdir(parents=True)
    (tmp_path / "val" / "n01" / "readme.txt").write_text("x")
    with pytest.raises(DatasetError, match="no images"):
        create_dataset("imagenet", tmp_path, "test")


"""CIFAR-10 and CIFAR-100 from the official python-version release.

In ``root``: the archive (``cifar-10-python.tar.gz`` / ``cifar-100-python.tar.gz``,
read without extracting) or its extracted folder (``cifar-10-batches-py/`` with
``data_batch_1..5``, ``test_batch``, ``batches.meta``; ``cifar-100-python/`` with
``train``, ``test``, ``meta``); ``root`` may also be that folder itself. Each
file is a pickled dict: ``b'data'`` uint8 ``[N, 3072]`` (channel-major 32x32),
``b'labels'`` (CIFAR-10) or ``b'fine_labels'`` (CIFAR-100).

Each file's MD5 is compared with the official release's; a difference is a
warning, not an error. Pickles are read with an unpickler that can only build
numpy arrays (and the bytes they hold): a file that asks for anything else, or
is not a dict with the expected keys, is refused with a DatasetError naming it.
"""
from __future__ import annotations

import hashlib
import io
import pickle
import tarfile
import warnings
import zlib
from pathlib import Path
from typing import Any, Callable, NamedTuple

import numpy as np
import torch

from .augment import image_train
from .base import ImageTensorDataset, resize_images
from .errors import DatasetError, locate
from .request import Request

__all__ = ["VARIANTS", "load", "read_pickle", "MAX_MEMBER_BYTES"]

# no file of the official releases is larger (CIFAR-100's train is 155 MB); an archive member
# claiming more is refused before a byte of it is inflated
MAX_MEMBER_BYTES = 256 << 20


class Variant(NamedTuple):
    """Layout and constants of one CIFAR release (mean, std of training pixels in [0, 1])."""

    archive: str
    folder: str
    members: dict[str, tuple[str, ...]]
    meta: str
    label_key: bytes
    names_key: bytes
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    md5: dict[str, str]  # of each member file of the official release


VARIANTS = {
    "cifar10": Variant("cifar-10-python.tar.gz", "cifar-10-batches-py",
                       {"train": tuple(f"data_batch_{i}" for i in range(1, 6)), "test": ("test_batch",)},
                       "batches.meta", b"labels", b"label_names",
                       (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616),
                       {"data_batch_1": "c99cafc152244af753f735de768cd75f",
                        "data_batch_2": "d4bba439e000b95fd0a9bffe97cbabec",
                        "data_batch_3": "54ebc095f3ab1f0389bbae665268c751",
                        "data_batch_4": "634d18415352ddfa80567beed471001a",
                        "data_batch_5": "482c414d41f54cd18b22e5b47cb7c3cb",
                        "test_batch": "40351d587109b95175f43aff81a1287e",
                        "batches.meta": "5ff9c542aee3614f3951f8cda6e48888"}),
    "cifar100": Variant("cifar-100-python.tar.gz", "cifar-100-python",
                        {"train": ("train",), "test": ("test",)},
                        "meta", b"fine_labels", b"fine_label_names",
                        (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762),
                        {"train": "16019d7e3df5f24257cddd939b257f8d",
                         "test": "f0ef6b0ae62326f3e7ffdfab6717acfc",
                         "meta": "7973b15100ade9c7d40fb424638fde48"}),
}

_SOURCE = "the official python-version archives come from www.cs.toronto.edu/~kriz/cifar.html"

_ALLOWED = {
    (module, name) for module in ("numpy.core.multiarray", "numpy._core.multiarray")
    for name in ("_reconstruct", "scalar")
} | {("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode")}


class _ArraysOnly(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in _ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}")
        return super().find_class(module, name)


def read_pickle(data: bytes, source: str, keys: tuple[bytes, ...]) -> dict:
    """Unpickle an official CIFAR file (``encoding='bytes'``), allowing only numpy arrays,
    and check it is a dict holding ``keys``; ``source`` names the file in errors."""
    try:
        obj = _ArraysOnly(io.BytesIO(data), encoding="bytes").load()
    except Exception as err:  # a broken pickle can raise almost anything
        raise DatasetError(f"{source}: not a readable CIFAR pickle ({type(err).__name__}: {err})") from err
    if not isinstance(obj, dict) or any(key not in obj for key in keys):
        found = sorted(obj) if isinstance(obj, dict) else type(obj).__name__
        raise DatasetError(f"{source}: expected a dict with keys {list(keys)}, found {found}")
    return obj


def _batch(obj: dict, source: str, label_key: bytes) -> tuple[np.ndarray, np.ndarray]:
    """Check one data file's contents: ``(images uint8 [N, 3, 32, 32], labels int64 [N])``."""
    data, labels = obj[b"data"], np.asarray(obj[label_key])
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
        shape = getattr(data, "shape", None)
        raise DatasetError(f"{source}: b'data' must be uint8 [N, 3072], got {type(data).__name__} {shape}")
    if labels.shape != (len(data),) or labels.dtype.kind not in "iu":
        raise DatasetError(f"{source}: expected {len(data)} integer labels, got shape {list(labels.shape)}")
    return data.reshape(-1, 3, 32, 32), labels.astype(np.int64)


Reader = Callable[[list[str]], list[tuple[bytes, str]]]


def _folder_reader(folder: Path) -> Reader:
    def read(members: list[str]) -> list[tuple[bytes, str]]:
        out = []
        for member in members:
            path = folder / member
            if not path.is_file():
                raise DatasetError(f"{path}: missing file of the official layout")
            if path.stat().st_size > MAX_MEMBER_BYTES:
                raise DatasetError(f"{path}: larger than {MAX_MEMBER_BYTES >> 20} MiB; not a file of the "
                                   "official release: refused")
            out.append((path.read_bytes(), str(path)))
        return out
    return read


def _archive_reader(archive: Path, prefix: str) -> Reader:
    def read(members: list[str]) -> list[tuple[bytes, str]]:
        wanted = {f"{prefix}/{m}": m for m in members}
        found: dict[str, bytes] = {}
        try:
            with tarfile.open(archive, "r:gz") as tar:
                for info in tar:  # one pass: a gzip stream cannot seek back cheaply
                    if info.size > MAX_MEMBER_BYTES or info.issparse():
                        raise DatasetError(f"{archive}: member {info.name!r} claims {info.size} bytes "
                                           f"(sparse: {info.issparse()}); no member of the official "
                                           f"archive is larger than {MAX_MEMBER_BYTES >> 20} MiB: refused")
                    if info.name in wanted and info.isfile():
                        found[wanted[info.name]] = tar.extractfile(info).read()
        except (tarfile.TarError, OSError, EOFError, zlib.error) as err:
            raise DatasetError(f"{archive}: corrupted or truncated archive ({err})") from err
        missing = [m for m in members if m not in found]
        if missing:
            raise DatasetError(f"{archive}: lacks {prefix}/{missing[0]} of the official layout")
        return [(found[m], f"{archive}:{prefix}/{m}") for m in members]
    return read


def _prober(variant: Variant) -> Callable[[Path], Reader | None]:
    def probe(folder: Path) -> Reader | None:
        if (folder / variant.folder).is_dir():
            return _folder_reader(folder / variant.folder)
        if (folder / variant.meta).is_file():
            return _folder_reader(folder)
        if (folder / variant.archive).is_file():
            return _archive_reader(folder / variant.archive, variant.folder)
        return None
    return probe


def _check_md5(variant: Variant, member: str, data: bytes, source: str) -> None:
    """Warn (not fail: the layout is what matters) when a file differs from the official one."""
    digest = hashlib.md5(data).hexdigest()
    if digest != variant.md5[member]:
        warnings.warn(f"{source}: MD5 {digest} differs from the official release's "
                      f"{variant.md5[member]}; reading it anyway", stacklevel=3)


def load(request: Request) -> ImageTensorDataset:
    """The requested CIFAR split as an in-memory dataset of ``[3, 32, 32]`` items."""
    variant = VARIANTS[request.name]
    read = locate(f"{request.name}: {variant.archive} or {variant.folder}/", request.places(),
                  _prober(variant), _SOURCE)
    members = [variant.meta, *variant.members[request.split]]
    contents = read(members)
    for member, (data, source) in zip(members, contents):
        _check_md5(variant, member, data, source)
    (meta_bytes, meta_source), *files = contents
    meta = read_pickle(meta_bytes, meta_source, (variant.names_key,))
    names = meta[variant.names_key]
    expected = 10 if request.name == "cifar10" else 100
    if not isinstance(names, (list, tuple)) or len(names) != expected \
            or not all(isinstance(n, (bytes, str)) for n in names):
        raise DatasetError(f"{meta_source}: {variant.names_key!r} must be a list of {expected} class names, "
                           f"got {type(names).__name__} of {len(names) if hasattr(names, '__len__') else '?'}")
    try:
        classes = [name.decode() if isinstance(name, bytes) else name for name in names]
    except UnicodeDecodeError:
        raise DatasetError(f"{meta_source}: class names are not UTF-8 text") from None
    parts = [_batch(read_pickle(data, source, (b"data", variant.label_key)), source, variant.label_key)
             for data, source in files]
    images = torch.from_numpy(np.concatenate([p[0] for p in parts]))
    labels = torch.from_numpy(np.concatenate([p[1] for p in parts]))
    if len(labels) and (int(labels.min()) < 0 or int(labels.max()) >= len(classes)):
        raise DatasetError(f"{request.name}: labels outside 0..{len(classes) - 1} in {request.split} files")
    if request.size is not None:
        images = resize_images(images, request.size)
    recipe = request.recipe(lambda: image_train(
        size=tuple(images.shape[-2:]), padding=4, autoaugment=request.autoaugment,
        cutout=request.cutout, fill=variant.mean))
    return ImageTensorDataset(images, labels, classes, variant.mean, variant.std, recipe)

"""ImageNet (ILSVRC-2012) from the usual folder layout, decoded with Pillow.

``root/train/<wnid>/*.JPEG`` and ``root/val/<wnid>/*.JPEG`` (the validation
images sorted into one folder per class); split "test" reads ``val``. Classes
are the split folder's sorted wnid folder names. Training with augmentation:
random-resized crop (scale 0.08-1, aspect 3/4-4/3) to ``size`` then the tensor
recipe (flip, optional AutoAugment and Cutout); otherwise resize the shorter
side to ``size`` · 256/224 and centre-crop ``size``. ``size`` defaults to 224.
Items: ``[3, size, size]`` float32, normalised with ImageNet's mean and std.
"""
from __future__ import annotations

import math
import os
from pathlib import Path

import torch
from PIL import Image
from torch import Generator, Tensor

from .augment import Augment, Normalize, image_train
from .base import FileDataset
from .errors import DatasetError, locate
from .request import Request

__all__ = ["ImageFolder", "load", "MEAN", "STD"]

MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)
_EXTENSIONS = {".jpeg", ".jpg", ".png"}
_SOURCE = ("the official ILSVRC-2012 images come from image-net.org (train and val archives; "
           "sort val into one folder per wnid)")
_FOLDERS = {"train": "train", "test": "val"}


class ImageFolder(FileDataset):
    """Images in class folders, decoded per item; ``crop`` is the output side in pixels.

    ``random_crop``: random-resized crop (training) instead of resize + centre crop.
    """

    def __init__(self, files: list[Path], labels: Tensor, classes: list[str], *, crop: int,
                 random_crop: bool, augment: Augment | None = None) -> None:
        super().__init__(files, labels, classes, augment)
        self.crop = crop
        self.random_crop = random_crop
        self.normalize = Normalize(MEAN, STD)

    def load(self, path: Path, generator: Generator | None, augment: Augment | None) -> Tensor:
        """``[3, crop, crop]`` float32, normalised."""
        image = _decode(path)
        box = _random_box(image.size, generator) if self.random_crop else None
        x = _to_tensor(_fit(image, self.crop, box)).unsqueeze(0)
        if augment is not None:
            x = augment(x, generator)
        return self.normalize(x)[0]


def _decode(path: Path) -> Image.Image:
    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
        raise DatasetError(f"{path}: cannot decode image ({err})") from err


def _random_box(size: tuple[int, int], generator: Generator | None) -> tuple[int, int, int, int]:
    """A random-resized-crop box (left, top, right, bottom): area 8-100 %, aspect 3/4-4/3;
    after 10 failed draws, the largest centred box of aspect within range."""
    width, height = size
    area = width * height
    for _ in range(10):
        u = torch.rand(4, generator=generator).tolist()
        target = area * (0.08 + 0.92 * u[0])
        aspect = math.exp(math.log(3 / 4) + u[1] * math.log(16 / 9))
        w, h = round(math.sqrt(target * aspect)), round(math.sqrt(target / aspect))
        if 0 < w <= width and 0 < h <= height:
            left, top = int(u[2] * (width - w + 1)), int(u[3] * (height - h + 1))
            return left, top, left + w, top + h
    w, h = min(width, round(height * 4 / 3)), min(height, round(width * 4 / 3))
    left, top = (width - w) // 2, (height - h) // 2
    return left, top, left + w, top + h


def _fit(image: Image.Image, crop: int, box: tuple[int, int, int, int] | None) -> Image.Image:
    """Resize ``box`` to ``crop`` x ``crop``; with no box, resize the shorter side to
    ``crop`` · 256/224 and take the centre ``crop`` x ``crop``."""
    if box is not None:
        return image.resize((crop, crop), Image.Resampling.BILINEAR, box=box)
    width, height = image.size
    short = round(crop * 256 / 224)
    scale = short / min(width, height)
    w, h = max(crop, round(width * scale)), max(crop, round(height * scale))
    left, top = (w - crop) // 2, (h - crop) // 2
    return image.resize((w, h), Image.Resampling.BILINEAR).crop((left, top, left + crop, top + crop))


def _to_tensor(image: Image.Image) -> Tensor:
    """RGB image -> ``[3, H, W]`` float32 in [0, 1]."""
    pixels = torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8)
    return pixels.view(image.height, image.width, 3).permute(2, 0, 1).float().div_(255)


def _scan(folder: Path) -> tuple[list[Path], list[int], list[str]]:
    classes = sorted(entry.name for entry in os.scandir(folder) if entry.is_dir())
    files: list[Path] = []
    labels: list[int] = []
    for label, wnid in enumerate(classes):
        names = sorted(e.name for e in os.scandir(folder / wnid)
                       if e.is_file() and os.path.splitext(e.name)[1].lower() in _EXTENSIONS)
        files += [folder / wnid / name for name in names]
        labels += [label] * len(names)
    return files, labels, classes


def load(request: Request) -> ImageFolder:
    """The requested ImageNet split (file list scanned now, images decoded per item)."""
    sub = _FOLDERS[request.split]
    folder = locate(f"imagenet: {sub}/<wnid>/*.JPEG", request.places(),
                    lambda root: root / sub if (root / sub).is_dir() else None, _SOURCE)
    files, labels, classes = _scan(folder)
    if not files:
        raise DatasetError(f"{folder}: no images (.JPEG, .jpg, .png) in class folders")
    crop = request.size or 224
    recipe = request.recipe(lambda: image_train(
        size=(crop, crop), autoaugment=request.autoaugment, cutout=request.cutout, fill=MEAN))
    return ImageFolder(files, torch.tensor(labels), classes, crop=crop,
                       random_crop=request.augment is not False, augment=recipe)

"""Random augmentations on tensors, reproducible from an explicit ``torch.Generator``.

An augmentation is a callable ``aug(x, generator=None) -> Tensor`` on a batch
whose first dimension indexes samples: images ``[B, C, H, W]`` with values in
[0, 1] (augmentations run before normalisation), event frames
``[B, T, 2, H, W]``. Every sample gets its own random draw; all draws come from
``generator`` (torch's default generator when None) in a fixed order, so the
same generator state always gives the same output. No torchvision.

    >>> aug = image_train(size=(32, 32), padding=4, autoaugment=True, cutout=16)
    >>> x = aug(images, torch.Generator().manual_seed(0))    # [B, 3, 32, 32]
"""
from __future__ import annotations

from typing import Callable, NamedTuple, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Generator, Tensor

from . import imageops

__all__ = [
    "Augment", "Compose", "RandomCrop", "RandomHorizontalFlip", "RandomRoll", "Cutout",
    "Normalize", "AutoAugment", "image_train", "event_train",
]

Augment = Callable[[Tensor, Optional[Generator]], Tensor]


class Compose:
    """Apply ``ops`` in order, sharing one generator."""

    def __init__(self, *ops: Augment) -> None:
        self.ops = ops

    def __call__(self, x: Tensor, generator: Generator | None = None) -> Tensor:
        for op in self.ops:
            x = op(x, generator)
        return x

    def __repr__(self) -> str:
        return f"Compose({', '.join(map(repr, self.ops))})"


def _take(x: Tensor, rows: Tensor, cols: Tensor) -> Tensor:
    """Per-sample pixel gather: ``out[b, ..., i, j] = x[b, ..., rows[b, i], cols[b, j]]``.

    ``x`` ``[B, ..., H, W]``, ``rows`` ``[B, h]``, ``cols`` ``[B, w]`` -> ``[B, ..., h, w]``.
    """
    b, lead, width = x.shape[0], x.shape[1:-2], x.shape[-1]
    flat = x.reshape(b, -1, x.shape[-2] * width)
    pixel = (rows[:, :, None] * width + cols[:, None, :]).reshape(b, 1, -1)
    out = flat.gather(2, pixel.expand(-1, flat.shape[1], -1))
    return out.reshape(b, *lead, rows.shape[1], cols.shape[1])


def _per_sample(mask: Tensor, x: Tensor) -> Tensor:
    """``[B]`` -> ``[B, 1, ..., 1]`` broadcastable against ``x``."""
    return mask.reshape(-1, *[1] * (x.dim() - 1))


class RandomCrop:
    """Zero-pad ``padding`` pixels on every side, then crop a random ``size`` window.

    ``size``: int (square) or ``(h, w)``. Input ``[B, ..., H, W]`` -> ``[B, ..., h, w]``.
    """

    def __init__(self, size: int | tuple[int, int], padding: int = 0) -> None:
        self.size = (size, size) if isinstance(size, int) else tuple(size)
        self.padding = padding

    def __call__(self, x: Tensor, generator: Generator | None = None) -> Tensor:
        p = self.padding
        padded = F.pad(x, [p, p, p, p]) if p else x
        (h, w), (hp, wp) = self.size, padded.shape[-2:]
        if h > hp or w > wp:
            raise ValueError(f"RandomCrop: crop {h}x{w} larger than padded input {hp}x{wp}")
        top = torch.randint(0, hp - h + 1, (len(x),), generator=generator)
        left = torch.randint(0, wp - w + 1, (len(x),), generator=generator)
        return _take(padded, top[:, None] + torch.arange(h), left[:, None] + torch.arange(w))

    def __repr__(self) -> str:
        return f"RandomCrop(size={self.size}, padding={self.padding})"


class RandomHorizontalFlip:
    """Mirror left-right (the last dimension) with probability ``p`` per sample."""

    def __init__(self, p: float = 0.5) -> None:
        self.p = p

    def __call__(self, x: Tensor, generator: Generator | None = None) -> Tensor:
        flip = torch.rand(len(x), generator=generator) < self.p
        return torch.where(_per_sample(flip, x), x.flip(-1), x)

    def __repr__(self) -> str:
        return f"RandomHorizontalFlip(p={self.p})"


class RandomRoll:
    """Roll (translate with wrap-around) by a random ``(dy, dx)`` in ``[-max_shift, max_shift]``.

    Meant for event frames ``[B, T, 2, H, W]``: one shift per sample, the same for all T.
    """

    def __init__(self, max_shift: int) -> None:
        self.max_shift = max_shift

    def __call__(self, x: Tensor, generator: Generator | None = None) -> Tensor:
        m, (h, w) = self.max_shift, x.shape[-2:]
        dy = torch.randint(-m, m + 1, (len(x), 1), generator=generator)
        dx = torch.randint(-m, m + 1, (len(x), 1), generator=generator)
        return _take(x, (torch.arange(h) - dy) % h, (torch.arange(w) - dx) % w)

    def __repr__(self) -> str:
        return f"RandomRoll(max_shift={self.max_shift})"


def _channel_values(values: float | Sequence[float], dtype: torch.dtype) -> Tensor:
    """A number or per-channel sequence -> tensor broadcastable over ``[..., C, H, W]``."""
    return torch.as_tensor(values, dtype=dtype).reshape(-1, 1, 1)


class Cutout:
    """Fill one ``size`` x ``size`` square per sample (centre uniform over the image,
    clipped at the borders; DeVries & Taylor 2017) with ``fill``.

    ``fill``: a number or one value per channel; pass the dataset mean (in [0, 1]
    units) to get zeros after normalisation, as the original Cutout does.
    """

    def __init__(self, size: int, fill: float | Sequence[float] = 0.0) -> None:
        self.size = size
        self.fill = fill

    def __call__(self, x: Tensor, generator: Generator | None = None) -> Tensor:
        h, w = x.shape[-2:]
        cy = torch.randint(0, h, (len(x), 1), generator=generator) - self.size // 2
        cx = torch.randint(0, w, (len(x), 1), generator=generator) - self.size // 2
        rows = (torch.arange(h) >= cy) & (torch.arange(h) < cy + self.size)
        cols = (torch.arange(w) >= cx) & (torch.arange(w) < cx + self.size)
        square = (rows[:, :, None] & cols[:, None, :]).reshape(len(x), *[1] * (x.dim() - 3), h, w)
        return torch.where(square, _channel_values(self.fill, x.dtype), x)

    def __repr__(self) -> str:
        return f"Cutout(size={self.size}, fill={self.fill})"


class Normalize:
    """``(x - mean) / std`` per channel (dimension -3); deterministic."""

    def __init__(self, mean: Sequence[float], std: Sequence[float]) -> None:
        self.mean = tuple(mean)
        self.std = tuple(std)

    def __call__(self, x: Tensor, generator: Generator | None = None) -> Tensor:
        return (x - _channel_values(self.mean, x.dtype)) / _channel_values(self.std, x.dtype)

    def __repr__(self) -> str:
        return f"Normalize(mean={self.mean}, std={self.std})"


class _Op(NamedTuple):
    fn: Callable[..., Tensor]
    value: Callable[[Tensor], Tensor] | None  # level in [0, 1] -> argument of fn
    signed: bool  # a random sign is drawn for the argument


def _factor(level: Tensor) -> Tensor:
    return 0.1 + 1.8 * level


_OPS: dict[str, _Op] = {
    "shear_x": _Op(imageops.shear_x, lambda level: 0.3 * level, True),
    "shear_y": _Op(imageops.shear_y, lambda level: 0.3 * level, True),
    "translate_x": _Op(imageops.translate_x, lambda level: 10 / 32 * level, True),
    "translate_y": _Op(imageops.translate_y, lambda level: 10 / 32 * level, True),
    "rotate": _Op(imageops.rotate, lambda level: 30 * level, True),
    "auto_contrast": _Op(imageops.auto_contrast, None, False),
    "invert": _Op(imageops.invert, None, False),
    "equalize": _Op(imageops.equalize, None, False),
    "solarize": _Op(imageops.solarize, lambda level: 1 - level, False),
    "posterize": _Op(imageops.posterize, lambda level: 8 - torch.round(4 * level), False),
    "contrast": _Op(imageops.contrast, _factor, False),
    "color": _Op(imageops.color, _factor, False),
    "brightness": _Op(imageops.brightness, _factor, False),
    "sharpness": _Op(imageops.sharpness, _factor, False),
}

# AutoAugment's CIFAR-10 policy (Cubuk et al., CVPR 2019, appendix): 25 sub-policies
# of two (operation, probability, magnitude 0..9) steps.
CIFAR10_POLICY = (
    (("invert", 0.1, 7), ("contrast", 0.2, 6)),
    (("rotate", 0.7, 2), ("translate_x", 0.3, 9)),
    (("sharpness", 0.8, 1), ("sharpness", 0.9, 3)),
    (("shear_y", 0.5, 8), ("translate_y", 0.7, 9)),
    (("auto_contrast", 0.5, 8), ("equalize", 0.9, 2)),
    (("shear_y", 0.2, 7), ("posterize", 0.3, 7)),
    (("color", 0.4, 3), ("brightness", 0.6, 7)),
    (("sharpness", 0.3, 9), ("brightness", 0.7, 9)),
    (("equalize", 0.6, 5), ("equalize", 0.5, 1)),
    (("contrast", 0.6, 7), ("sharpness", 0.6, 5)),
    (("color", 0.7, 7), ("translate_x", 0.5, 8)),
    (("equalize", 0.3, 7), ("auto_contrast", 0.4, 8)),
    (("translate_y", 0.4, 3), ("sharpness", 0.2, 6)),
    (("brightness", 0.9, 6), ("color", 0.2, 8)),
    (("solarize", 0.5, 2), ("invert", 0.0, 3)),
    (("equalize", 0.2, 0), ("auto_contrast", 0.6, 0)),
    (("equalize", 0.2, 8), ("equalize", 0.6, 4)),
    (("color", 0.9, 9), ("equalize", 0.6, 6)),
    (("auto_contrast", 0.8, 4), ("solarize", 0.2, 8)),
    (("brightness", 0.1, 3), ("color", 0.7, 0)),
    (("solarize", 0.4, 5), ("auto_contrast", 0.9, 3)),
    (("translate_y", 0.9, 9), ("translate_y", 0.7, 9)),
    (("auto_contrast", 0.9, 2), ("solarize", 0.8, 3)),
    (("equalize", 0.8, 8), ("invert", 0.1, 3)),
    (("translate_y", 0.7, 9), ("auto_contrast", 0.9, 1)),
)


class AutoAugment:
    """AutoAugment with the CIFAR-10 policy, on image batches ``[B, C, H, W]`` in [0, 1].

    Each sample draws one of the 25 sub-policies of ``CIFAR10_POLICY``; each of its
    two steps is applied with the step's probability. All 14 operations of the
    policy are implemented (``imageops``). Magnitude m in 0..9 maps linearly,
    with level = m/9, onto the paper's ranges:
    ShearX/Y ±0.3 · level; TranslateX/Y ±(10/32 of the side) · level (10 px on
    CIFAR); Rotate ±30° · level (random sign for these five); Color, Contrast,
    Brightness, Sharpness factor 0.1 + 1.8 · level (the paper's [0.1, 1.9]);
    Solarize threshold 1 - level; Posterize to 8 - round(4 · level) bits;
    AutoContrast, Equalize, Invert take no magnitude. Geometric operations use
    nearest-neighbour sampling and fill uncovered pixels with grey (0.5).
    Not implemented: the SVHN and ImageNet policies, Cutout and SamplePairing
    as policy operations (``Cutout`` is a separate augmentation here).
    """

    def __init__(self, policy: Sequence[Sequence[tuple[str, float, int]]] = CIFAR10_POLICY) -> None:
        self.names = sorted({step[0] for sub in policy for step in sub})
        unknown = set(self.names) - set(_OPS)
        if unknown:
            raise ValueError(f"AutoAugment: unknown operations {sorted(unknown)}; known: {sorted(_OPS)}")
        self.op = torch.tensor([[self.names.index(name) for name, _, _ in sub] for sub in policy])
        self.prob = torch.tensor([[p for _, p, _ in sub] for sub in policy])
        self.level = torch.tensor([[m / 9 for _, _, m in sub] for sub in policy])

    def __call__(self, x: Tensor, generator: Generator | None = None) -> Tensor:
        b = len(x)
        sub = torch.randint(0, len(self.op), (b,), generator=generator)
        apply = torch.rand(b, 2, generator=generator) < self.prob[sub]
        sign = torch.where(torch.rand(b, 2, generator=generator) < 0.5, -1.0, 1.0)
        out = x.clone()
        for step in range(2):
            ops = self.op[sub, step]
            for k in ops[apply[:, step]].unique().tolist():
                rows = torch.nonzero(apply[:, step] & (ops == k)).squeeze(1)
                level = self.level[sub[rows], step]
                out[rows] = self._run(self.names[k], out[rows], level, sign[rows, step])
        return out

    @staticmethod
    def _run(name: str, x: Tensor, level: Tensor, sign: Tensor) -> Tensor:
        op = _OPS[name]
        if op.value is None:
            return op.fn(x)
        value = op.value(level)
        return op.fn(x, value * sign if op.signed else value)

    def __repr__(self) -> str:
        return f"AutoAugment({len(self.op)} sub-policies)"


def image_train(
    *,
    size: tuple[int, int],
    padding: int = 0,
    flip: bool = True,
    autoaugment: bool = False,
    cutout: int = 0,
    fill: float | Sequence[float] = 0.0,
) -> Compose:
    """The usual training recipe for ``size`` images: random crop with ``padding``
    (skipped when 0), horizontal flip, AutoAugment (CIFAR policy), Cutout of
    ``cutout`` pixels filled with ``fill`` (skipped when 0), in that order."""
    ops: list[Augment] = []
    if padding:
        ops.append(RandomCrop(size, padding))
    if flip:
        ops.append(RandomHorizontalFlip())
    if autoaugment:
        ops.append(AutoAugment())
    if cutout:
        ops.append(Cutout(cutout, fill))
    return Compose(*ops)


def event_train(max_shift: int) -> Compose:
    """Event-frame recipe for ``[B, T, 2, H, W]``: horizontal flip, then a roll of up to
    ``max_shift`` pixels in each direction (the same for every time step of a sample)."""
    return Compose(RandomHorizontalFlip(), RandomRoll(max_shift))

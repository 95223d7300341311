"""Deterministic image operations on float tensors, the building blocks of AutoAugment.

Every function takes a batch ``x`` of shape ``[N, C, H, W]`` with values in
[0, 1] (C = 1 or 3) and, where the operation has a strength, a tensor ``v`` of
shape ``[N]`` with one value per image; it returns a new ``[N, C, H, W]`` tensor
in [0, 1]. Colour operations follow Pillow's ImageEnhance / ImageOps
definitions (blend with a degenerate image, 8-bit histogram equalisation);
geometric ones sample with nearest neighbour and fill uncovered pixels with a
constant. Nothing here draws random numbers: see ``augment.py``.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "affine", "shear_x", "shear_y", "translate_x", "translate_y", "rotate", "auto_contrast", "invert",
    "equalize", "solarize", "posterize", "contrast", "color", "brightness", "sharpness",
]

_LUMA = (0.299, 0.587, 0.114)


def _per_image(v: Tensor) -> Tensor:
    """``[N]`` -> ``[N, 1, 1, 1]`` for broadcasting over an image batch."""
    return v.reshape(-1, 1, 1, 1)


def affine(x: Tensor, theta: Tensor, fill: float = 0.5) -> Tensor:
    """Warp each image by ``theta`` ``[N, 2, 3]`` (output -> input, normalised coordinates).

    Pixels that come from outside the image take the value ``fill``.
    """
    n, c, h, w = x.shape
    grid = F.affine_grid(theta.to(x.dtype), [n, c + 1, h, w], align_corners=False)
    with_mask = torch.cat([x, torch.ones_like(x[:, :1])], dim=1)
    out = F.grid_sample(with_mask, grid, mode="nearest", padding_mode="zeros", align_corners=False)
    inside = out[:, c:]
    return out[:, :c] * inside + fill * (1 - inside)


def _identity_theta(n: int) -> Tensor:
    return torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]]).repeat(n, 1, 1)


def shear_x(x: Tensor, v: Tensor) -> Tensor:
    """Horizontal shear: input column = output column + ``v`` * output row."""
    h, w = x.shape[-2:]
    theta = _identity_theta(len(x))
    theta[:, 0, 1] = v * h / w
    return affine(x, theta)


def shear_y(x: Tensor, v: Tensor) -> Tensor:
    """Vertical shear: input row = output row + ``v`` * output column."""
    h, w = x.shape[-2:]
    theta = _identity_theta(len(x))
    theta[:, 1, 0] = v * w / h
    return affine(x, theta)


def translate_x(x: Tensor, v: Tensor) -> Tensor:
    """Shift right by ``v`` (a fraction of the width; negative: left)."""
    theta = _identity_theta(len(x))
    theta[:, 0, 2] = -2 * v
    return affine(x, theta)


def translate_y(x: Tensor, v: Tensor) -> Tensor:
    """Shift down by ``v`` (a fraction of the height; negative: up)."""
    theta = _identity_theta(len(x))
    theta[:, 1, 2] = -2 * v
    return affine(x, theta)


def rotate(x: Tensor, v: Tensor) -> Tensor:
    """Rotate about the centre by ``v`` degrees (counter-clockwise on screen)."""
    h, w = x.shape[-2:]
    a = v * (math.pi / 180)
    theta = torch.zeros(len(x), 2, 3)
    theta[:, 0, 0] = torch.cos(a)
    theta[:, 0, 1] = -torch.sin(a) * h / w
    theta[:, 1, 0] = torch.sin(a) * w / h
    theta[:, 1, 1] = torch.cos(a)
    return affine(x, theta)


def auto_contrast(x: Tensor) -> Tensor:
    """Stretch each channel so its darkest pixel is 0 and its brightest 1."""
    lo = x.amin(dim=(-2, -1), keepdim=True)
    hi = x.amax(dim=(-2, -1), keepdim=True)
    span = hi - lo
    return torch.where(span > 0, (x - lo) / span.clamp(min=1e-12), x)


def invert(x: Tensor) -> Tensor:
    """``1 - x``."""
    return 1 - x


def _levels(x: Tensor) -> Tensor:
    """8-bit levels 0..255 (int64) of a [0, 1] image."""
    return (x * 255).round().clamp(0, 255).long()


def equalize(x: Tensor) -> Tensor:
    """Histogram-equalise each channel on 256 levels (Pillow's ``ImageOps.equalize``).

    A channel whose histogram has a single level is left unchanged.
    """
    n, c, h, w = x.shape
    q = _levels(x).reshape(n * c, h * w)
    hist = torch.zeros(n * c, 256, dtype=torch.long).scatter_add_(1, q, torch.ones_like(q))
    last = (torch.arange(256) * (hist > 0)).argmax(dim=1, keepdim=True)
    step = (h * w - hist.gather(1, last)) // 255
    before = hist.cumsum(dim=1) - hist
    lut = ((before + step // 2) // step.clamp(min=1)).clamp(max=255)
    lut = torch.where(step > 0, lut, torch.arange(256))
    return (lut.gather(1, q).reshape(n, c, h, w).to(x.dtype) / 255)


def solarize(x: Tensor, v: Tensor) -> Tensor:
    """Invert every pixel at or above the threshold ``v`` (in [0, 1])."""
    return torch.where(x >= _per_image(v), 1 - x, x)


def posterize(x: Tensor, v: Tensor) -> Tensor:
    """Keep the ``v`` (1..8) most significant bits of each 8-bit level."""
    drop = (8 - v.long()).reshape(-1, 1, 1, 1)
    keep_mask = 255 - ((1 << drop) - 1)
    return (_levels(x) & keep_mask).to(x.dtype) / 255


def _blend(x: Tensor, degenerate: Tensor, factor: Tensor) -> Tensor:
    """``degenerate + factor (x - degenerate)``, clipped: Pillow's ImageEnhance."""
    f = _per_image(factor)
    return (degenerate + f * (x - degenerate)).clamp(0, 1)


def _gray(x: Tensor) -> Tensor:
    """Luma ``[N, 1, H, W]`` (the image itself when it has one channel)."""
    if x.shape[1] == 1:
        return x
    weights = torch.tensor(_LUMA, dtype=x.dtype).reshape(1, 3, 1, 1)
    return (x * weights).sum(dim=1, keepdim=True)


def contrast(x: Tensor, v: Tensor) -> Tensor:
    """Blend with the image's mean grey level by factor ``v`` (1: unchanged)."""
    mean = _gray(x).mean(dim=(-3, -2, -1), keepdim=True)
    return _blend(x, mean.expand_as(x), v)


def color(x: Tensor, v: Tensor) -> Tensor:
    """Blend with the grey image by factor ``v`` (saturation; 1: unchanged)."""
    return _blend(x, _gray(x).expand_as(x), v)


def brightness(x: Tensor, v: Tensor) -> Tensor:
    """Blend with black by factor ``v`` (1: unchanged)."""
    return _blend(x, torch.zeros_like(x), v)


def sharpness(x: Tensor, v: Tensor) -> Tensor:
    """Blend with a 3x3-smoothed image (centre weight 5 of 13) by ``v``; borders kept."""
    c = x.shape[1]
    kernel = torch.ones(3, 3, dtype=x.dtype)
    kernel[1, 1] = 5
    kernel = (kernel / kernel.sum()).expand(c, 1, 3, 3)
    smooth = x.clone()
    smooth[..., 1:-1, 1:-1] = F.conv2d(x, kernel, groups=c)
    return _blend(x, smooth, v)

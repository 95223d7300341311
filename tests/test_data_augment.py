"""Tensor augmentations: shapes, reproducibility from a generator, and the 8-bit
operations checked against Pillow's own ImageOps / ImageEnhance."""
import numpy as np
import pytest
import torch
from PIL import Image, ImageEnhance, ImageOps

from spikegrad.data import augment, imageops
from spikegrad.data.augment import (AutoAugment, Cutout, Normalize, RandomCrop,
                                    RandomHorizontalFlip, RandomRoll)


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def images(b: int = 8, c: int = 3, h: int = 16, w: int = 16, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 256, (b, c, h, w), generator=gen(seed)).float() / 255


@pytest.mark.parametrize("op", [
    RandomCrop(16, padding=4), RandomHorizontalFlip(), RandomRoll(3), Cutout(6, fill=(0.1, 0.2, 0.3)),
    AutoAugment(), augment.image_train(size=(16, 16), padding=2, autoaugment=True, cutout=4),
], ids=repr)
def test_same_generator_same_output(op):
    x = images()
    a, b, c = op(x, gen(1)), op(x, gen(1)), op(x, gen(2))
    assert a.shape == x.shape and a.dtype == x.dtype
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert 0 <= a.min() and a.max() <= 1


def test_crop_takes_a_window_of_the_padded_image():
    x = torch.arange(2 * 1 * 6 * 6, dtype=torch.float32).reshape(2, 1, 6, 6) + 1
    out = RandomCrop(6, padding=2)(x, gen(3))
    padded = torch.nn.functional.pad(x, [2, 2, 2, 2])
    for b in range(2):
        windows = [padded[b, :, i:i + 6, j:j + 6] for i in range(5) for j in range(5)]
        assert any(torch.equal(out[b], w) for w in windows)
    assert torch.equal(RandomCrop(6)(x, gen(0)), x)
    assert RandomCrop((4, 5))(x, gen(0)).shape == (2, 1, 4, 5)


def test_flip_and_roll_on_event_frames():
    frames = torch.rand(4, 3, 2, 8, 8, generator=gen(0))  # [B, T, 2, H, W]
    assert torch.equal(RandomHorizontalFlip(p=1.0)(frames, gen(0)), frames.flip(-1))
    assert torch.equal(RandomHorizontalFlip(p=0.0)(frames, gen(0)), frames)
    rolled = RandomRoll(2)(frames, gen(4))
    for b in range(4):
        shifts = [(dy, dx) for dy in range(-2, 3) for dx in range(-2, 3)
                  if torch.equal(rolled[b], frames[b].roll((dy, dx), dims=(-2, -1)))]
        assert len(shifts) == 1


def test_cutout_fills_one_square():
    x = torch.ones(16, 3, 12, 12)
    out = Cutout(4, fill=(0.0, 0.5, 0.25))(x, gen(0))
    holes = out[:, 0] == 0
    assert torch.equal(out[:, 1][holes], torch.full_like(out[:, 1][holes], 0.5))
    per_image = holes.flatten(1).sum(1)
    assert per_image.max() == 16 and per_image.min() >= 4  # clipped at the borders


def test_normalize():
    x = torch.rand(2, 3, 4, 4)
    out = Normalize((0.5, 0.4, 0.3), (0.2, 0.25, 0.5))(x)
    torch.testing.assert_close(out[:, 2], (x[:, 2] - 0.3) / 0.5)


# ---------------------------------------------------------------- operations against Pillow

def to_pil(x: torch.Tensor) -> Image.Image:
    return Image.fromarray((x * 255).round().byte().permute(1, 2, 0).numpy())


def from_pil(image: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1).float() / 255


@pytest.mark.parametrize("ours,pillow", [
    (imageops.equalize, ImageOps.equalize),
    (imageops.invert, ImageOps.invert),
    (lambda x: imageops.posterize(x, torch.full((len(x),), 3.0)), lambda im: ImageOps.posterize(im, 3)),
    (lambda x: imageops.solarize(x, torch.full((len(x),), 128 / 255)), lambda im: ImageOps.solarize(im, 128)),
], ids=["equalize", "invert", "posterize", "solarize"])
def test_8bit_operations_match_pillow_exactly(ours, pillow):
    x = ((images(b=3, h=9, w=11, seed=5) * 0.6 + 0.1) * 255).round() / 255  # 8-bit, narrow range
    out = ours(x)
    for b in range(3):
        assert torch.equal((out[b] * 255).round(), (from_pil(pillow(to_pil(x[b]))) * 255).round())


@pytest.mark.parametrize("ours,enhancer", [
    (imageops.brightness, ImageEnhance.Brightness), (imageops.color, ImageEnhance.Color),
    (imageops.contrast, ImageEnhance.Contrast), (imageops.sharpness, ImageEnhance.Sharpness),
], ids=["brightness", "color", "contrast", "sharpness"])
@pytest.mark.parametrize("factor", [0.1, 0.6, 1.9])
def test_enhancers_match_pillow(ours, enhancer, factor):
    x = images(b=2, h=10, w=10, seed=6)
    out = ours(x, torch.full((2,), factor))
    for b in range(2):
        expected = from_pil(enhancer(to_pil(x[b])).enhance(factor))
        torch.testing.assert_close(out[b, :, 1:-1, 1:-1], expected[:, 1:-1, 1:-1], atol=3 / 255, rtol=0)


def test_auto_contrast_stretches_each_channel():
    x = images(b=2, seed=7) * 0.5 + 0.2
    out = imageops.auto_contrast(x)
    assert torch.allclose(out.amin(dim=(-2, -1)), torch.zeros(2, 3))
    assert torch.allclose(out.amax(dim=(-2, -1)), torch.ones(2, 3))
    flat = torch.full((1, 3, 4, 4), 0.3)
    assert torch.equal(imageops.auto_contrast(flat), flat)


@pytest.mark.parametrize("op", [imageops.shear_x, imageops.shear_y, imageops.translate_x,
                                imageops.translate_y, imageops.rotate])
def test_geometric_operations_at_zero_are_identity(op):
    x = images(b=2, h=8, w=12)
    assert torch.equal(op(x, torch.zeros(2)), x)


def test_translate_and_rotate_move_pixels():
    x = torch.zeros(1, 1, 4, 4)
    x[0, 0, 1, 1] = 1.0
    right = imageops.translate_x(x, torch.tensor([0.25]))  # one pixel right, grey fill
    assert right[0, 0, 1, 2] == 1.0 and right[0, 0, 1, 1] == 0.0 and right[0, 0, 0, 0] == 0.5
    quarter = imageops.rotate(torch.rand(1, 3, 6, 6), torch.tensor([90.0]))
    assert quarter.shape == (1, 3, 6, 6)
    x = torch.rand(1, 3, 6, 6)
    torch.testing.assert_close(imageops.rotate(x, torch.tensor([90.0])), x.rot90(1, dims=(-2, -1)))


def test_autoaugment_policy_and_single_channel():
    policy = AutoAugment()
    assert len(policy.op) == 25 and policy.prob.shape == (25, 2)
    gray = images(b=16, c=1, seed=8)
    out = policy(gray, gen(0))
    assert out.shape == gray.shape and 0 <= out.min() and out.max() <= 1
    with pytest.raises(ValueError, match="unknown operations"):
        AutoAugment([(("warp", 0.5, 3), ("invert", 0.5, 0))])

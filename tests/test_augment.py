"""Batched augmentation: every op is per-sample, keeps shape/dtype, and does what it says."""

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from cifar_ray.config import AugConfig
from cifar_ray.data.augment import alternate_flip, augment, normalize, rotate

OFF = AugConfig(crop_pad=0, hflip="none", vflip=False, rotate=0.0, cutout=0)


def off(**kw) -> AugConfig:
    return dataclasses.replace(OFF, **kw)


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def run(x, cfg, *, epoch=0, seed=0, g=None, fill=0):
    indices = torch.arange(len(x))
    return augment(x, cfg, epoch=epoch, indices=indices, generator=g or gen(), seed=seed,
                   fill=fill)


def same_images(b=64, h=32, seed=0):
    """A batch of one random image repeated: any difference between samples is the aug's."""
    img = torch.randint(0, 256, (1, 3, h, h), dtype=torch.uint8, generator=gen(seed))
    return img.expand(b, -1, -1, -1).contiguous()


def white(b=16):
    return torch.full((b, 3, 32, 32), 255, dtype=torch.uint8)


ALL_OPS = [
    off(crop_pad=4), off(crop_pad=4, pad_mode="zeros"), off(hflip="random"),
    off(hflip="alternate"), off(vflip=True), off(rotate=30.0), off(rotate=30.0, rotate_fill="reflect"),
    off(rotate=30.0, rotate_fill="crop"), off(cutout=8), AugConfig(vflip=True, rotate=15, cutout=12),
]


@pytest.mark.parametrize("cfg", ALL_OPS, ids=repr)
def test_every_op_keeps_shape_and_dtype_and_varies_per_sample(cfg):
    x = same_images()
    y = run(x, cfg)
    assert y.shape == x.shape and y.dtype == torch.uint8 and y.device == x.device
    assert len(torch.unique(y.flatten(1), dim=0)) > 1, "all samples got the same transform"


def test_all_off_is_identity():
    x = same_images()
    assert torch.equal(run(x, OFF), x)


@pytest.mark.parametrize("pad_mode,torch_mode", [("zeros", "constant"), ("reflect", "reflect")])
def test_crop_is_a_shift_of_the_padded_image(pad_mode, torch_mode):
    pad = 4
    x = same_images(b=128)
    y = run(x, off(crop_pad=pad, pad_mode=pad_mode))
    padded = F.pad(x[:1].float(), (pad,) * 4, mode=torch_mode).to(torch.uint8)[0]
    windows = {(dy, dx): padded[:, dy:dy + 32, dx:dx + 32]
               for dy in range(2 * pad + 1) for dx in range(2 * pad + 1)}
    seen = set()
    for out in y:
        match = [k for k, w in windows.items() if torch.equal(out, w)]
        assert match, "an output is not a window of the padded image"
        seen.add(match[0])
    assert len(seen) > 30  # 81 offsets; 128 draws cover most of them


@pytest.mark.parametrize("cfg,dim", [(off(hflip="random"), 3), (off(vflip=True), 2)])
def test_random_flip_flips_about_half_of_the_samples(cfg, dim):
    x = same_images(b=400)
    y = run(x, cfg)
    flipped = (y == x.flip(dim)).flatten(1).all(1)
    kept = (y == x).flatten(1).all(1)
    assert bool((flipped | kept).all())
    assert 140 < int(flipped.sum()) < 260


def test_alternate_flip_flips_each_image_in_exactly_one_of_two_epochs():
    x = same_images(b=200)
    y0 = run(x, off(hflip="alternate"), epoch=4, seed=7)
    y1 = run(x, off(hflip="alternate"), epoch=5, seed=7)
    f0 = (y0 == x.flip(3)).flatten(1).all(1)
    f1 = (y1 == x.flip(3)).flatten(1).all(1)
    assert bool((f0 ^ f1).all())
    assert 60 < int(f0.sum()) < 140  # the phase is random per image
    # The phase depends on the image's dataset index and the seed, not on the generator.
    idx = torch.arange(1000)
    assert torch.equal(alternate_flip(idx, 4, seed=7), alternate_flip(idx, 6, seed=7))
    assert not torch.equal(alternate_flip(idx, 4, seed=7), alternate_flip(idx, 4, seed=8))


def test_alternate_flip_needs_indices():
    with pytest.raises(ValueError, match="indices"):
        augment(same_images(), off(hflip="alternate"), epoch=0, indices=None, generator=gen())


ANGLES = torch.tensor([30.0, -30.0, 45.0, -40.0, 35.0])


def corners(y):
    return torch.stack([y[..., 0, 0], y[..., 0, -1], y[..., -1, 0], y[..., -1, -1]])


def test_rotation_black_fill_leaves_dark_corners():
    y = rotate(white(len(ANGLES)), ANGLES, "black")
    assert int(corners(y).max()) < 30
    assert int(y[..., 12:20, 12:20].min()) == 255  # the centre stays


@pytest.mark.parametrize("fill", ["crop", "reflect"])
def test_rotation_crop_and_reflect_fill_leave_no_empty_corner(fill):
    y = rotate(white(len(ANGLES)), ANGLES, fill)
    assert int(y.min()) >= 250  # every pixel, the four corners included


def test_rotation_by_random_angles_with_crop_fill_stays_white():
    y = run(white(64), off(rotate=45.0, rotate_fill="crop"))
    assert int(y.min()) >= 250
    y = run(white(64), off(rotate=45.0, rotate_fill="black"))
    assert float(corners(y).float().mean()) < 128


def test_rotation_geometry():
    x = same_images(b=2)
    assert torch.equal(rotate(x, torch.zeros(2)), x)
    quarter = rotate(x, torch.full((2,), 90.0))  # lands exactly on pixel centres
    assert torch.equal(quarter, x.rot90(1, (2, 3))) or torch.equal(quarter, x.rot90(-1, (2, 3)))


@pytest.mark.parametrize("size", [1, 8, 32])
def test_cutout_zeroes_exactly_one_square_per_sample(size):
    y = run(white(32), off(cutout=size))
    for out in y:
        zero = (out == 0).all(0)  # (H, W): all three channels cut
        assert int(zero.sum()) == size * size
        assert int((out == 0).sum()) == 3 * size * size
        rows, cols = zero.nonzero().unbind(1)
        assert int(rows.max() - rows.min()) + 1 == size and int(cols.max() - cols.min()) + 1 == size
    if size < 32:
        assert len(torch.unique(y.flatten(1), dim=0)) > 1  # squares placed per sample


def test_cutout_paints_the_fill_per_channel():
    fill = torch.tensor([125, 122, 113], dtype=torch.uint8)
    y = run(white(8), off(cutout=8), fill=fill)
    cut = (y != 255).any(1)  # (B,H,W)
    assert int(cut.sum()) == 8 * 64
    for c in range(3):
        assert bool((y[:, c][cut] == fill[c]).all())


def test_same_generator_seed_same_batch_other_seed_other_batch():
    x = same_images()
    cfg = AugConfig(vflip=True, rotate=10.0, cutout=8)
    assert torch.equal(run(x, cfg, g=gen(3)), run(x, cfg, g=gen(3)))
    assert not torch.equal(run(x, cfg, g=gen(3)), run(x, cfg, g=gen(4)))


def test_normalize_gives_zero_mean_unit_std_per_channel():
    g = gen(1)
    x = torch.stack([torch.randint(lo, hi, (256, 32, 32), dtype=torch.uint8, generator=g)
                     for lo, hi in [(0, 256), (50, 100), (200, 230)]], 1)
    xf = x.double() / 255
    mean = xf.mean((0, 2, 3)).tolist()
    std = xf.std((0, 2, 3), unbiased=False).tolist()
    for channels_last in (False, True):
        y = normalize(x, mean, std, channels_last=channels_last)
        assert y.dtype == torch.float32 and y.shape == x.shape
        assert y.is_contiguous(memory_format=torch.channels_last) == channels_last
        assert torch.allclose(y.mean((0, 2, 3)), torch.zeros(3), atol=1e-4)
        assert torch.allclose(y.std((0, 2, 3), unbiased=False), torch.ones(3), atol=1e-4)
    assert normalize(x, mean, std, dtype=torch.bfloat16).dtype == torch.bfloat16


def test_normalize_does_not_modify_a_float_input():
    x = torch.full((2, 3, 4, 4), 128.0)
    normalize(x, [0.5] * 3, [0.25] * 3)
    assert bool((x == 128.0).all())


def test_augment_refuses_a_float_batch():
    with pytest.raises(ValueError, match="uint8"):
        augment(torch.zeros(2, 3, 32, 32), OFF, epoch=0, indices=None, generator=gen())

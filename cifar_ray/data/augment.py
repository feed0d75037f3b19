"""Batched, per-sample random augmentation on the batch's own device.

Every op draws one random parameter per sample and applies it to the whole batch in a few
tensor ops: no Python loop over images, no host round trip, the same code on CPU and CUDA.
`augment` takes and returns uint8 (B,3,H,W) in 0..255, so the loader moves 1 byte per pixel
until `normalize` makes the float the model eats.

Order: rotation (the only float op), then translate (= crop of the padded image), flips and
cutout, all four fused into ONE uint8 gather: output pixel (i, j) of sample b reads a source
pixel computed by integer index arithmetic, or one of two constant pixels appended to the
source (0 for zero padding, the fill for cutout). Padding is never materialised.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from cifar_ray.config import AugConfig

__all__ = ["augment", "normalize", "rotate", "alternate_flip"]


def augment(x: Tensor, cfg: AugConfig, *, epoch: int, indices: Tensor | None,
            generator: torch.Generator, seed: int = 0, fill: Tensor | int = 0) -> Tensor:
    """Randomly augment a uint8 batch (B,3,H,W); returns a new uint8 batch of the same shape.

    `indices` are the batch's dataset indices and `seed` the run seed: `hflip="alternate"`
    needs both (an image's flip phase is a hash of its index and the seed), the other ops draw
    from `generator`, which must live on `x.device`. `fill` is the cutout value, a scalar or a
    per-channel (3,) uint8 tensor on `x.device`; the loader passes the dataset mean, so a cut
    square is ~0 after normalisation (the usual cutout). Padding (`pad_mode=zeros`) and
    `rotate_fill=black` fill with 0 (black), as the seed's rotation did.
    Rotation assumes square images (angles are taken in normalised coordinates).
    """
    if x.dtype != torch.uint8 or x.dim() != 4:
        raise ValueError(f"augment expects a uint8 (B,C,H,W) batch, got {x.dtype} {tuple(x.shape)}")
    if cfg.rotate > 0:
        u = torch.rand(x.shape[0], generator=generator, device=x.device)
        x = rotate(x, (2 * u - 1) * cfg.rotate, cfg.rotate_fill)
    return _shift_flip_cutout(x, cfg, epoch, indices, generator, seed, fill)


def normalize(x: Tensor, mean, std, *, channels_last: bool = False,
              dtype: torch.dtype = torch.float32) -> Tensor:
    """uint8 (or float 0..255) (B,3,H,W) -> `dtype` (x/255 - mean)/std, per channel.

    `mean`/`std` are per-channel on the 0-1 scale: sequences, or tensors already on
    `x.device` (then nothing is copied to the device per call).
    """
    mean = torch.as_tensor(mean, dtype=torch.float32, device=x.device).view(1, -1, 1, 1)
    std = torch.as_tensor(std, dtype=torch.float32, device=x.device).view(1, -1, 1, 1)
    # One multiply-add, x * 1/(255 std) - mean/std, in fp32 whatever `dtype` is, on NCHW:
    # a per-channel broadcast over channels_last memory is ~5x slower on CPU than
    # converting the result afterwards.
    out = x.to(torch.float32, memory_format=torch.contiguous_format, copy=True)  # never x itself
    out = out.mul_(1.0 / (255.0 * std)).sub_(mean / std).to(dtype)
    return out.contiguous(memory_format=torch.channels_last) if channels_last else out


def alternate_flip(indices: Tensor, epoch: int, seed: int) -> Tensor:
    """Bool (B,): airbench's alternating flip. Each image gets a random phase from (index,
    seed), fixed for the run, and is flipped on every other epoch: exactly one of any two
    consecutive epochs sees it mirrored, so every epoch pair shows both views."""
    return ((_hash32(indices, seed) + epoch) & 1).bool()


# ---------------------------------------------------------------- the ops


def rotate(x: Tensor, degrees: Tensor, fill: str = "black") -> Tensor:
    """Rotate each uint8 image of (B,C,H,W) by its own angle in `degrees` (B,), bilinear.

    `fill` says what the corners the rotation uncovers show: black (zeros), reflect (the
    image mirrored at its edges) or crop (zoom in until the rotated image covers the frame).
    """
    angle = degrees.to(device=x.device, dtype=torch.float32) * (math.pi / 180)
    cos, sin = angle.cos(), angle.sin()
    if fill == "crop":
        # Zoom in by |cos|+|sin|: the output frame's corners then map inside the source, so
        # no pixel comes from outside the image (the seed's black-corner fix).
        scale = cos.abs() + sin.abs()
        cos, sin = cos / scale, sin / scale
    zero = torch.zeros_like(cos)
    theta = torch.stack([torch.stack([cos, -sin, zero], 1), torch.stack([sin, cos, zero], 1)], 1)
    xf = x.to(torch.float32)
    grid = F.affine_grid(theta, list(xf.shape), align_corners=False)
    # crop uses "border" only for the half-pixel rim bilinear reads at the frame's edge.
    padding = {"black": "zeros", "reflect": "reflection", "crop": "border"}[fill]
    out = F.grid_sample(xf, grid, mode="bilinear", padding_mode=padding, align_corners=False)
    # Bilinear mixes of 0..255 stay in 0..255: round half up by truncation, no clamp needed.
    return out.add_(0.5).to(torch.uint8)


def _shift_flip_cutout(x, cfg, epoch, indices, gen, seed, fill):
    B, C, H, W = x.shape
    dev = x.device
    pad = cfg.crop_pad
    # Draw in a fixed order so a config always consumes the generator the same way.
    dy = _randint(-pad, pad + 1, B, gen, dev) if pad else None
    dx = _randint(-pad, pad + 1, B, gen, dev) if pad else None
    if cfg.hflip == "random":
        hflip = _randint(0, 2, B, gen, dev).bool()
    elif cfg.hflip == "alternate":
        if indices is None:
            raise ValueError("hflip='alternate' needs the batch's dataset indices")
        hflip = alternate_flip(indices.to(dev), epoch, seed)
    else:
        hflip = None
    vflip = _randint(0, 2, B, gen, dev).bool() if cfg.vflip else None
    size = min(cfg.cutout, H, W)
    if dy is None and hflip is None and vflip is None and size == 0:
        return x

    rows, row_ok = _source_index(H, B, dy, vflip, cfg.pad_mode, dev)
    cols, col_ok = _source_index(W, B, dx, hflip, cfg.pad_mode, dev)
    flat = rows[:, :, None] * W + cols[:, None, :]  # (B,H,W) into the (H*W + 2) source
    if row_ok is not None:
        flat = flat.masked_fill(~(row_ok[:, :, None] & col_ok[:, None, :]), H * W)
    if size:
        # One square per sample, wholly inside the image, so every sample loses exactly
        # size^2 pixels (the original cutout lets the centre fall anywhere).
        top = _randint(0, H - size + 1, B, gen, dev)[:, None]
        left = _randint(0, W - size + 1, B, gen, dev)[:, None]
        r, c = torch.arange(H, device=dev), torch.arange(W, device=dev)
        in_rows = (r >= top) & (r < top + size)
        in_cols = (c >= left) & (c < left + size)
        flat = flat.masked_fill(in_rows[:, :, None] & in_cols[:, None, :], H * W + 1)

    consts = x.new_zeros(B, C, 2)  # source pixel H*W is black, H*W + 1 the cutout fill
    if size:
        consts[:, :, 1] = fill.to(x.dtype) if isinstance(fill, Tensor) else fill
    src = torch.cat([x.reshape(B, C, H * W), consts], 2)
    out = src.gather(2, flat.view(B, 1, H * W).expand(B, C, H * W))
    return out.view(B, C, H, W)


def _source_index(n, B, shift, flip, pad_mode, dev):
    """(B, n) source coordinate of each output coordinate, and a (B, n) in-range mask in
    zeros mode (else None)."""
    idx = torch.arange(n, device=dev).expand(B, n)
    if flip is not None:
        idx = torch.where(flip[:, None], n - 1 - idx, idx)
    if shift is None:
        return idx, None
    idx = idx + shift[:, None]
    if pad_mode == "reflect":
        # Mirror about the edge pixels (F.pad's "reflect": -1 -> 1), for any shift size.
        period = 2 * (n - 1)
        idx = idx.remainder(period)
        return torch.minimum(idx, period - idx), None
    ok = (idx >= 0) & (idx < n)
    return idx.clamp(0, n - 1), ok


def _randint(low, high, n, gen, dev):
    return torch.randint(low, high, (n,), generator=gen, device=dev)


def _hash32(v: Tensor, seed: int) -> Tensor:
    """A 32-bit integer mix of `v` and `seed`, elementwise, identical on every device; all
    intermediates stay below 2**59 so int64 never overflows."""
    m = 0xFFFFFFFF
    h = (v.to(torch.int64) ^ (seed * 0x9E3779B1 & m)) & m
    for _ in range(2):
        h = ((h >> 16) ^ h) * 0x45D9F3B & m
    return (h >> 16) ^ h

"""Decoding JPEG and PNG bytes into uint8 (N, 32, 32, 3) arrays, in parallel for large sets.

`decode_images` takes (name, bytes) pairs as they are read from a source; `open_image`
opens one image file safely (its size checked before it is decoded), for prepare and
predict alike.
"""

from __future__ import annotations

import io
import multiprocessing
import os
import warnings
from concurrent.futures import ProcessPoolExecutor
from typing import Iterable, Iterator

import numpy as np

from cifar_ray.errors import UserError, quote

CHUNK = 2048  # images per decode task
# Pixels an image may have: every image becomes 32x32 anyway, and this holds an 8K frame
# (7680x4320). Beyond it, a small file would decode into gigabytes (PIL's generic limit,
# 89M with only a warning up to 179M, is far above what this tool needs).
MAX_PIXELS = 2**25


def decode_images(items: Iterable[tuple[str, bytes]], resize: bool = False) -> np.ndarray:
    """Decode (name, bytes) pairs into one uint8 (N, 32, 32, 3) array, in order.

    A few thousand images decode here with PIL. Beyond one chunk, worker processes decode
    chunks while this process goes on reading the source, and JPEGs go through torchvision's
    batched libjpeg-turbo decoder (faster than PIL per image: BENCHMARKS.md, "Data
    preparation"); its import costs
    seconds, so it is only worth it for a large set. Workers are forked, so they inherit
    the imports instead of paying them again.
    """
    chunks = _batched(items, CHUNK)
    first = next(chunks, [])
    second = next(chunks, None)
    if second is None:
        return _decode_chunk(first, resize, fast=False)
    fast = _torchvision_decoder() is not None
    context = multiprocessing.get_context("fork") if hasattr(os, "fork") else None
    if context is None:  # no fork (Windows): decode here
        return np.concatenate([_decode_chunk(c, resize, fast) for c in (first, second, *chunks)])
    pool = ProcessPoolExecutor(_cpu_count(), mp_context=context)
    try:
        futures = [pool.submit(_decode_chunk, c, resize, fast) for c in (first, second)]
        futures += [pool.submit(_decode_chunk, c, resize, fast) for c in chunks]
        return np.concatenate([f.result() for f in futures])
    finally:
        pool.shutdown(cancel_futures=True)


def _decode_chunk(chunk: list[tuple[str, bytes]], resize: bool, fast: bool) -> np.ndarray:
    out = np.empty((len(chunk), 32, 32, 3), np.uint8)
    todo = range(len(chunk))
    if fast:
        jpegs = [i for i, (_, blob) in enumerate(chunk) if blob[:3] == b"\xff\xd8\xff"]
        done = _decode_jpegs_torchvision([chunk[i][1] for i in jpegs], out, jpegs)
        todo = sorted(set(todo) - done)
    for i in todo:  # PNGs, odd sizes, and anything torchvision refused: PIL names the culprit
        out[i] = _decode_pil(*chunk[i], resize)
    return out


def _torchvision_decoder():
    try:
        from torchvision.io import ImageReadMode, decode_jpeg
    except ImportError:
        return None
    return decode_jpeg, ImageReadMode


def _decode_jpegs_torchvision(blobs, out, where) -> set[int]:
    """Decode 32x32 JPEGs into out[where]; return the indices done (none if any failed)."""
    import torch

    decode_jpeg, mode = _torchvision_decoder()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # read-only buffers; torchvision's own deprecation notice
        try:
            images = decode_jpeg([torch.frombuffer(b, dtype=torch.uint8) for b in blobs], mode=mode.RGB)
        except (RuntimeError, ValueError):
            return set()
    done = [i for i, img in zip(where, images) if img.shape == (3, 32, 32)]
    if done:  # decode_jpeg's CHW tensors are views of HWC buffers: permuted back, one copy
        out[done] = torch.stack([img.permute(1, 2, 0) for img in images if img.shape == (3, 32, 32)]).numpy()
    return set(done)


def open_image(name: str, file, failed: str = "cannot decode the image",
               fix: str = "replace or remove the file"):
    """An image file (a path or a file object) as a PIL image in RGB, 8 bits per channel;
    UserError("{name}: {failed} ...; {fix}") for one that is not an image or larger than
    MAX_PIXELS. The size is checked from the header, before anything is decoded."""
    from PIL import Image, UnidentifiedImageError

    try:
        with warnings.catch_warnings():  # PIL's own bomb warning: MAX_PIXELS is ours
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(file) as img:
                w, h = img.size
                if w * h > MAX_PIXELS:
                    raise UserError(f"{name}: {failed}: it is {w}x{h} pixels, more than the "
                                    f"{MAX_PIXELS:,} cifar-ray decodes (a decompression bomb, or "
                                    f"a picture far larger than the 32x32 it becomes); shrink it or {fix}")
                return to_rgb(img)
    except UnidentifiedImageError:
        raise UserError(f"{name}: {failed} (not an image file PIL knows); {fix}") from None
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        # A truncated file, a corrupt one, or a header beyond PIL's own limit.
        raise UserError(f"{name}: {failed} ({quote(e)}); {fix}") from None


def to_rgb(img):
    """`img` in RGB, 8 bits per channel. PIL's convert("RGB") is right for 8-bit modes
    (grayscale, palette, RGBA and LA lose alpha, CMYK) but clips 16- and 32-bit integer
    and float pixels at 255 instead of scaling them: a 16-bit grayscale PNG came out
    nearly white. Those are scaled from their type's full range (float: from 0..1)."""
    from PIL import Image

    if img.mode not in ("I", "F") and not img.mode.startswith("I;"):
        return img.convert("RGB")
    pixels = np.asarray(img).astype(np.float64)
    if img.mode == "F":
        scaled = np.clip(np.nan_to_num(pixels), 0.0, 1.0) * 255.0
    else:  # I;16* (0..65535); I (32-bit): a 16-bit PNG's values, else the positive range
        top = 65535.0 if img.mode.startswith("I;16") or pixels.max(initial=0) <= 65535 else 2.0**31 - 1
        scaled = np.clip(pixels, 0.0, top) * (255.0 / top)
    gray = np.rint(scaled).astype(np.uint8)
    return Image.fromarray(np.repeat(gray[..., None], 3, axis=2), "RGB")


def _decode_pil(name: str, blob: bytes, resize: bool) -> np.ndarray:
    from PIL import Image, ImageOps

    img = open_image(name, io.BytesIO(blob))
    if img.size != (32, 32):
        if not resize:
            w, h = img.size
            raise UserError(f"{name}: image is {w}x{h}, not 32x32; resize it or pass --resize "
                            f"(scales the shorter side to 32, then crops the centre)")
        img = ImageOps.fit(img, (32, 32), Image.Resampling.BICUBIC)
    return np.asarray(img)


def _batched(items: Iterable, n: int) -> Iterator[list]:
    batch = []
    for item in items:
        batch.append(item)
        if len(batch) == n:
            yield batch
            batch = []
    if batch:
        yield batch


def _cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1

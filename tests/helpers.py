"""What several test modules build from: a tiny layer spec, and tiny image sources (image
files, ImageFolder trees, archives, CIFAR-10 batches in the official layout, a pickle that
runs code when loaded)."""

from __future__ import annotations

import io
import pickle
import socket
import sys
import tarfile
import zipfile
from pathlib import Path

import numpy as np
from PIL import Image

from cifar_ray.data import sources

# A small net that learns the synthetic data within a few epochs on CPU.
# Metrics that are bit-identical between equal runs (the timings are not).
DETERMINISTIC = ("train_loss", "train_acc", "val_loss", "val_acc", "lr")

TINY_SPEC = """\
- {conv: 16, kernel: 3, padding: same, batchnorm: true}
- {maxpool: 2}
- {conv: 32, kernel: 3, padding: same, batchnorm: true}
- {maxpool: 2}
- gap
"""


def tiny_spec(path: Path, dropout: float = 0.0) -> str:
    """Write TINY_SPEC (with a dropout layer before the pooling when `dropout`) to `path`."""
    text = TINY_SPEC.replace("- gap", f"- {{dropout: {dropout}}}\n- gap") if dropout else TINY_SPEC
    path.write_text(text)
    return str(path)


# The base of the tests' sweeps: a small `cnn` that learns the synthetic data in ~1 s an epoch.
SWEEP_BASE = {"model": {"name": "cnn", "args": {"depth": 2, "filters": 16, "convs": 1,
                                                "dense_layers": 0}},
              "train": {"epochs": 3, "batch_size": 32},
              "optim": {"lr": 0.1, "warmup_epochs": 0.0}, "aug": {"crop_pad": 0, "hflip": "none"}}


# ---------------------------------------------------------------- image sources

def random_images(n: int, seed: int, size=(32, 32)) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, size[1], size[0], 3), dtype=np.uint8)


def encode(img: np.ndarray, fmt: str = "PNG", mode: str | None = None) -> bytes:
    buf = io.BytesIO()
    pil = Image.fromarray(img)
    if mode:
        pil = pil.convert(mode)
    pil.save(buf, format=fmt, quality=95)
    return buf.getvalue()


def tree(classes=("cat", "dog", "frog"), per_class=4, two_splits=False, fmt="PNG", seed=0):
    files, pixels = {}, {}
    ext = "png" if fmt == "PNG" else "jpg"
    for s, split in enumerate(("train", "test") if two_splits else ("train",)):
        for c, cls in enumerate(classes):
            for i, img in enumerate(random_images(per_class, seed * 100 + s * 10 + c)):
                name = f"{split}/{cls}/{i:03d}.{ext}" if two_splits else f"{cls}/{i:03d}.{ext}"
                files[name] = encode(img, fmt)
                pixels[name] = img
    return files, pixels


def write_dir(root: Path, files: dict[str, bytes]) -> Path:
    for name, blob in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(blob)
    return root


def write_tar(path: Path, files: dict[str, bytes], mode="w:gz", extra=()) -> Path:
    with tarfile.open(path, mode) as tf:
        for name, blob in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(blob)
            tf.addfile(info, io.BytesIO(blob))
        for info in extra:
            tf.addfile(info)
    return path


def write_zip(path: Path, files: dict[str, bytes]) -> Path:
    with zipfile.ZipFile(path, "w") as zf:
        for name, blob in files.items():
            zf.writestr(name, blob)
    return path


CLASS_NAMES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def fake_batches(per_batch=6) -> tuple[dict[str, bytes], dict]:
    """Tiny batches in the official pickle layout (uint8 rows of 3072, channel-planar)."""
    files, arrays = {}, {}
    for i, name in enumerate(sources.CIFAR10_TRAIN + sources.CIFAR10_TEST):
        hwc = random_images(per_batch, 50 + i)
        labels = [(i + k) % 10 for k in range(per_batch)]
        rows = hwc.transpose(0, 3, 1, 2).reshape(per_batch, 3072)
        files[name] = pickle.dumps({"batch_label": name, "labels": labels, "data": rows,
                                    "filenames": [f"{k}.png" for k in range(per_batch)]})
        arrays[name] = (hwc, labels)
    files["batches.meta"] = pickle.dumps({"label_names": CLASS_NAMES, "num_cases_per_batch": per_batch,
                                          "num_vis": 3072})
    return files, arrays


def official_tarball(path: Path, files: dict[str, bytes]) -> Path:
    return write_tar(path, {f"cifar-10-batches-py/{n}": b for n, b in files.items()}, "w:gz")


def evil_pickle(marker: Path) -> bytes:
    """A pickle that creates `marker` when loaded: the reason nothing unverified is unpickled."""
    class Evil:
        def __reduce__(self):
            return (Path.touch, (marker,))

    return pickle.dumps(Evil())


def tar_member(name: str, kind: bytes, linkname: str = "") -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = linkname
    return info


RAY = str(Path(sys.executable).parent / "ray")  # the venv's `ray` command


def free_ports(n: int) -> list[int]:
    """n distinct free TCP ports on 127.0.0.1 (free when asked: a fixed port may collide
    with a Ray the user runs)."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()

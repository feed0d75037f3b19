"""A run's data on the driver: the dataset of `data.source` split into train / val (and
test, when the dataset has one) as the config says, ready to put in Ray's object store.
No Ray and no torch: train.py and tune.py call this before Ray starts."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from cifar_ray.config import Config
from cifar_ray.errors import UserError


@dataclass
class Split:
    """The arrays of one run: uint8 images, (N,32,32,3) or with `nchw` (N,3,32,32), and
    int64 labels per split."""
    train: tuple[np.ndarray, np.ndarray]
    val: tuple[np.ndarray, np.ndarray]
    classes: list[str]
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    test: tuple[np.ndarray, np.ndarray] | None = None
    source: str = ""  # the prepared dataset's folder

    @property
    def n_train(self) -> int:
        return len(self.train[1])

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for part in (self.train, self.val, self.test or ()) for a in part)


def load_split(cfg: Config, nchw: bool = False) -> Split:
    """The split of `cfg`'s data: val carved out of train (data.val_fraction, data.split_seed),
    train cut to data.limit images (stratified, val in proportion). `nchw`: images in the
    layout the device loader keeps, so that a CPU worker reads them in place (tune: one copy
    for every trial)."""
    from cifar_ray.data import load, stratified_subset, train_val_split

    ds = load(cfg.data.source)
    if "train" not in ds.splits:
        raise UserError(f"--data {cfg.data.source}: holds only a test split, nothing to train on; "
                        "give a train/<class>/ tree (a test-only set is for cifar-ray evaluate)")
    images, labels = ds.splits["train"]
    train_idx, val_idx = train_val_split(labels, cfg.data.val_fraction, cfg.data.split_seed)
    if cfg.data.limit:
        if cfg.data.limit > len(train_idx):
            raise UserError(f"data.limit={cfg.data.limit}: the training split has only "
                            f"{len(train_idx)} images; use a smaller --limit")
        keep = stratified_subset(labels[train_idx], cfg.data.limit, cfg.data.split_seed)
        train_idx = train_idx[keep]
        # Keep validation in proportion, so a --limit run also evaluates quickly.
        n_val = max(len(ds.classes), int(round(len(val_idx) * cfg.data.limit / len(labels))))
        if n_val < len(val_idx):
            val_idx = val_idx[stratified_subset(labels[val_idx], n_val, cfg.data.split_seed)]

    def part(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return (np.ascontiguousarray(x.transpose(0, 3, 1, 2)) if nchw else x), y

    test = part(*ds.splits["test"]) if "test" in ds.splits else None
    return Split(train=part(images[train_idx], labels[train_idx]),
                 val=part(images[val_idx], labels[val_idx]), classes=list(ds.classes),
                 mean=tuple(ds.mean), std=tuple(ds.std), test=test, source=str(ds.path))


def check_batch(cfg: Config, n_train: int, workers: int, where: str = "train.batch_size") -> None:
    """Refuse a global batch that leaves a worker without one full batch per epoch (the
    loader drops the last partial batch, so the epoch would have no step)."""
    per_worker = max(1, cfg.train.batch_size // workers)
    if n_train // workers < per_worker:
        raise UserError(f"{where}={cfg.train.batch_size}: each of {workers} worker(s) gets "
                        f"{n_train // workers} training images, fewer than its batch of "
                        f"{per_worker}; lower the batch size or use more data")

"""A device-resident loader: the whole split lives on the device as uint8, batches are index
gathers, augmentation runs there too.

CIFAR-10 is 150 MB as uint8, small enough to upload once per worker; after that an epoch
costs one permutation upload (N int64) and no host->device copy per step.

Sharding, per epoch, for `world_size` ranks (`batch_size` is per rank):
- training (`shuffle=True`): a permutation of 0..N-1 seeded by (seed, epoch), identical on
  every rank; rank r takes perm[r::world_size] cut to N // world_size, so every rank runs
  exactly the same number of steps (DDP collectives and `ray.train.report` are barriers).
  The <= world_size-1 samples left over change every epoch.
- evaluation (`shuffle=False, drop_last=False`): rank r takes r, r+W, r+2W, ... in order,
  no augmentation. Across ranks every sample appears exactly once; shards differ by at
  most one sample, so step counts may differ by one between ranks. Evaluate without
  per-step collectives: sum correct/loss/count locally, then one all_reduce after the loop
  (`num_samples` is this rank's count).
- `shuffle=False, drop_last=True`: the in-order shard cut to N // world_size (equal steps).
Augmentation draws from a generator on the device seeded by (seed, epoch, rank): the same
seed yields the same batches, whichever epoch a run resumes at. (CPU and CUDA random streams
differ, so the batches are reproducible per device type, not across them.)
"""

from __future__ import annotations

import hashlib
import warnings

import numpy as np
import torch
from torch import Tensor

from cifar_ray.config import AugConfig
from cifar_ray.data.augment import augment, normalize
from cifar_ray.errors import UserError

__all__ = ["DeviceLoader", "derive_seed"]


def derive_seed(*parts: int | str) -> int:
    """A 63-bit seed from a tuple such as (seed, "aug", epoch, rank): nearby tuples give
    unrelated streams, which seed + epoch arithmetic would not."""
    parts = tuple(p if isinstance(p, str) else int(p) for p in parts)  # np.int64 -> int
    digest = hashlib.blake2b(repr(parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


class DeviceLoader:
    """Batches of one split, resident on `device`; see the module docstring for sharding.
    `num_samples` is the number of samples this rank yields per epoch."""

    def __init__(self, images, labels, *, batch_size: int, device, mean, std,
                 aug: AugConfig | None = None, shuffle: bool = True, drop_last: bool = True,
                 seed: int = 0, rank: int = 0, world_size: int = 1, channels_last: bool = True):
        """`images`: uint8 (N,H,W,3) HWC numpy/tensor, or a uint8 (N,3,H,W) tensor (used as
        is, no copy, when already contiguous on `device`). `labels`: int (N,). `mean`/`std`:
        per-channel, 0-1 scale. `aug` applies only when `shuffle` is on (training)."""
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside world_size {world_size}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.device = torch.device(device)
        self.images = _to_nchw(images, self.device)
        self.labels = torch.as_tensor(labels).to(self.device, torch.int64)
        if self.labels.shape != (len(self.images),):
            raise ValueError(f"{len(self.images)} images but labels of shape "
                             f"{tuple(self.labels.shape)}")
        self.batch_size = batch_size
        self.aug = aug if shuffle else None
        self.shuffle, self.drop_last = shuffle, drop_last
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.channels_last = channels_last
        self.mean = torch.as_tensor(mean, dtype=torch.float32).to(self.device)
        self.std = torch.as_tensor(std, dtype=torch.float32).to(self.device)
        # Cutout paints the mean, which normalises to ~0: the usual cutout, kept in uint8.
        self._fill = (self.mean * 255).round().to(torch.uint8)
        self.epoch = 0
        n = len(self.images)
        uneven = not shuffle and not drop_last
        self.num_samples = len(range(rank, n, world_size)) if uneven else n // world_size
        if len(self) == 0 and n > 0 and not uneven:  # an eval rank may hold nothing
            raise UserError(f"batch size {batch_size} per worker exceeds the {self.num_samples} "
                            f"images each of {world_size} worker(s) gets; lower "
                            f"train.batch_size or use fewer workers")

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        """Steps per epoch on this rank."""
        full, tail = divmod(self.num_samples, self.batch_size)
        return full + (1 if tail and not self.drop_last else 0)

    def shard(self) -> Tensor:
        """This rank's dataset indices for the current epoch, in batch order, on the device."""
        n = len(self.images)
        if self.shuffle:
            # Permute on the CPU: the same order on every rank whatever its device.
            gen = torch.Generator().manual_seed(derive_seed(self.seed, "perm", self.epoch))
            order = torch.randperm(n, generator=gen).to(self.device)
        else:
            order = torch.arange(n, device=self.device)
        return order[self.rank::self.world_size][:self.num_samples]

    def __iter__(self):
        """Yields (x, y): x float32 (B,3,H,W) normalised (channels_last if asked), y int64."""
        shard = self.shard()
        gen = None
        if self.aug is not None:
            gen = torch.Generator(device=self.device)
            gen.manual_seed(derive_seed(self.seed, "aug", self.epoch, self.rank))
        for step in range(len(self)):
            idx = shard[step * self.batch_size:(step + 1) * self.batch_size]
            x = self.images.index_select(0, idx)
            if gen is not None:
                x = augment(x, self.aug, epoch=self.epoch, indices=idx, generator=gen,
                            seed=self.seed, fill=self._fill)
            yield (normalize(x, self.mean, self.std, channels_last=self.channels_last),
                   self.labels.index_select(0, idx))


def _to_nchw(images, device: torch.device) -> Tensor:
    """uint8 NCHW contiguous on `device`; a tensor already in that form is returned as is."""
    if isinstance(images, np.ndarray):
        with warnings.catch_warnings():
            # Ray's object store hands out read-only arrays; the loader never writes to them.
            warnings.filterwarnings("ignore", "The given NumPy array is not writable")
            t = torch.from_numpy(np.ascontiguousarray(images))
    else:
        t = torch.as_tensor(images)
    if t.dtype != torch.uint8 or t.dim() != 4:
        raise ValueError(f"images must be uint8 (N,H,W,3) or (N,3,H,W), got {t.dtype} "
                         f"{tuple(t.shape)}")
    if t.shape[1] != 3:
        if t.shape[-1] != 3:
            raise ValueError(f"images must have 3 channels, got shape {tuple(t.shape)}")
        # Upload first, then transpose: on a GPU the permute copy is the device's work.
        t = t.to(device).permute(0, 3, 1, 2)
    return t.to(device).contiguous()

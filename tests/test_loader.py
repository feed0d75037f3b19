"""DeviceLoader: sharding, equal step counts, determinism, layout.

Labels are set to the dataset index, so the yielded `y` says which samples a batch holds.
"""

import warnings

import numpy as np
import pytest
import torch

from cifar_ray.config import AugConfig
from cifar_ray.data.loader import DeviceLoader
from cifar_ray.errors import UserError

MEAN, STD = [0.49, 0.48, 0.45], [0.25, 0.24, 0.26]


def dataset(n=103, seed=0):
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8), np.arange(n, dtype=np.int64)


def loader(images, labels, **kw):
    kw = {"batch_size": 8, "device": "cpu", "mean": MEAN, "std": STD, **kw}
    return DeviceLoader(images, labels, **kw)


def indices_seen(ld):
    return [y.tolist() for _, y in ld]


def test_eval_covers_every_sample_exactly_once_across_ranks():
    images, labels = dataset(103)
    seen = []
    for rank in range(4):
        ld = loader(images, labels, shuffle=False, drop_last=False, rank=rank, world_size=4)
        batches = indices_seen(ld)
        assert len(batches) == len(ld)
        flat = sum(batches, [])
        assert flat == sorted(flat) and len(flat) == ld.num_samples
        seen += flat
    assert sorted(seen) == list(range(103))


@pytest.mark.parametrize("drop_last", [True, False])
def test_training_shards_are_disjoint_equal_and_take_equal_steps(drop_last):
    images, labels = dataset(103)
    aug = AugConfig(cutout=4)
    shards = []
    for rank in range(3):
        ld = loader(images, labels, aug=aug, drop_last=drop_last, rank=rank, world_size=3, seed=5)
        ld.set_epoch(2)
        batches = indices_seen(ld)
        assert len(batches) == len(ld) == (4 if drop_last else 5)  # 34 samples per rank
        assert all(len(b) == 8 for b in batches[:4])
        shards.append(sum(batches, []))
    sizes = {len(s) for s in shards}
    assert sizes == {32 if drop_last else 34}
    assert len(set().union(*map(set, shards))) == sum(map(len, shards))  # disjoint


def test_same_seed_same_batches_and_epochs_differ():
    images, labels = dataset(64)
    aug = AugConfig(rotate=10.0, cutout=8, hflip="alternate")

    def epoch(ld, e):
        ld.set_epoch(e)
        return [(x.clone(), y.clone()) for x, y in ld]

    a, b = loader(images, labels, aug=aug, seed=1), loader(images, labels, aug=aug, seed=1)
    for e in (0, 1):
        for (xa, ya), (xb, yb) in zip(epoch(a, e), epoch(b, e), strict=True):
            assert torch.equal(xa, xb) and torch.equal(ya, yb)
    e0, e1 = epoch(a, 0), epoch(a, 1)
    assert [y.tolist() for _, y in e0] != [y.tolist() for _, y in e1]
    assert all(torch.equal(x, x2) for (x, _), (x2, _) in zip(e0, epoch(a, 0)))  # replayable
    other = epoch(loader(images, labels, aug=aug, seed=2), 0)
    assert [y.tolist() for _, y in e0] != [y.tolist() for _, y in other]


def test_the_permutation_is_the_same_on_every_rank():
    images, labels = dataset(60)
    merged = [None] * 60
    for rank in range(2):
        ld = loader(images, labels, rank=rank, world_size=2, seed=9)
        ld.set_epoch(3)
        for pos, i in enumerate(ld.shard().tolist()):
            merged[pos * 2 + rank] = i
    assert sorted(merged) == list(range(60))  # interleaving the shards rebuilds one permutation


@pytest.mark.parametrize("n,batch,drop_last,steps", [(100, 10, True, 10), (100, 30, True, 3),
                                                     (100, 30, False, 4), (7, 8, False, 1)])
def test_len_matches_the_batches_yielded(n, batch, drop_last, steps):
    images, labels = dataset(n)
    ld = loader(images, labels, batch_size=batch, drop_last=drop_last)
    assert len(ld) == steps == len(indices_seen(ld))


def test_batches_are_normalized_nchw_of_the_hwc_input():
    images, labels = dataset(20)
    ld = loader(images, labels, shuffle=False, drop_last=False, batch_size=20, channels_last=True)
    (x, y), = list(ld)
    assert x.shape == (20, 3, 32, 32) and x.dtype == torch.float32 and y.dtype == torch.int64
    assert x.is_contiguous(memory_format=torch.channels_last)
    back = (x * torch.tensor(STD).view(1, 3, 1, 1) + torch.tensor(MEAN).view(1, 3, 1, 1)) * 255
    assert torch.equal(back.round().to(torch.uint8), torch.from_numpy(images).permute(0, 3, 1, 2))


def test_evaluation_ignores_augmentation():
    images, labels = dataset(16)
    plain = loader(images, labels, shuffle=False, drop_last=False)
    augmented = loader(images, labels, shuffle=False, drop_last=False, aug=AugConfig(cutout=16))
    for (x1, _), (x2, _) in zip(plain, augmented, strict=True):
        assert torch.equal(x1, x2)


def test_an_nchw_tensor_on_the_device_is_used_without_a_copy():
    images = torch.randint(0, 256, (10, 3, 32, 32), dtype=torch.uint8)
    ld = loader(images, torch.arange(10))
    assert ld.images.data_ptr() == images.data_ptr()


def test_a_read_only_array_from_the_object_store_is_accepted_quietly():
    images, labels = dataset(10)
    images.flags.writeable = False
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        (x, _), = list(loader(images, labels, batch_size=10))
    assert x.shape == (10, 3, 32, 32)


def test_a_batch_larger_than_the_shard_is_refused():
    images, labels = dataset(30)
    with pytest.raises(UserError, match="batch size"):
        loader(images, labels, batch_size=16, world_size=2, rank=1)


def test_eval_with_fewer_samples_than_ranks_leaves_some_ranks_empty():
    images, labels = dataset(3)
    lens = [len(loader(images, labels, shuffle=False, drop_last=False, rank=r, world_size=4))
            for r in range(4)]
    assert lens == [1, 1, 1, 0]


def test_mismatched_labels_are_refused():
    images, _ = dataset(10)
    with pytest.raises(ValueError, match="labels"):
        loader(images, np.arange(9))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_runs_on_cuda():
    images, labels = dataset(256)
    aug = AugConfig(hflip="alternate", vflip=True, rotate=15.0, rotate_fill="crop", cutout=8)
    ld = DeviceLoader(images, labels, batch_size=64, device="cuda", mean=MEAN, std=STD, aug=aug)
    ld.set_epoch(1)
    first = [(x.clone(), y.clone()) for x, y in ld]
    assert len(first) == 4 and all(x.is_cuda and y.is_cuda for x, y in first)
    again = list(ld)
    assert all(torch.equal(a, b) for (a, _), (b, _) in zip(first, again))
    # After the epoch's start (one permutation upload), steps never wait on the host.
    batches = iter(ld)
    next(batches)
    torch.cuda.set_sync_debug_mode("error")
    try:
        rest = list(batches)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert len(rest) == 3
    # The permutation is drawn on the CPU: the same order as a CPU loader's.
    cpu = loader(images, labels, batch_size=64, aug=aug)
    cpu.set_epoch(1)
    assert torch.equal(ld.shard().cpu(), cpu.shard())

"""Data: sources -> prepared Parquet store -> uint8 arrays, and the train/val split.

    prepare(source, out=None, *, resize=False) -> Path   decode once, cache by content hash
    load(source) -> Dataset                              any SOURCE, prepared on the fly
    train_val_split(labels, val_fraction, seed)          stratified, seeded
    stratified_subset(labels, n, seed)                   for --limit

Importing this is cheap (numpy, pyarrow); torch/torchvision load only when a source needs them.
"""

from cifar_ray.data.sources import SOURCE_HELP, cache_home
from cifar_ray.data.store import (
    Dataset,
    channel_stats,
    load,
    prepare,
    read_meta,
    stratified_subset,
    train_val_split,
)

__all__ = [
    "SOURCE_HELP",
    "Dataset",
    "cache_home",
    "channel_stats",
    "load",
    "prepare",
    "read_meta",
    "stratified_subset",
    "train_val_split",
]

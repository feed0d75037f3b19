"""The prepared store: decode a source once, keep it as Parquet, load it in a blink.

A prepared dataset is a directory:
    train.parquet, test.parquet (if the source has a test split)
        image: fixed_size_binary(3072) = uint8 HWC 32x32x3, so loading is a view, not a decode
        label: int16 (the class index)
    meta.json: classes, counts per split and class, train mean/std, source, content hash, version
Without --out it lives at `<cache>/prepared/<key>/`, the key hashing the source's content, the
format version and the options, so preparing the same source again finds it and returns at
once. It is written into a temp folder and renamed: an error or Ctrl-C leaves nothing behind.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from cifar_ray.data.sources import Decoded, Source, cache_home, find_source
from cifar_ray.errors import UserError, shown
from cifar_ray.fsutil import atomic_dir, check_writable_dir
from cifar_ray.values import is_number

FORMAT_VERSION = 1
SPLIT_NAMES = ("train", "test")
IMAGE_BYTES = 32 * 32 * 3
SCHEMA = pa.schema([("image", pa.binary(IMAGE_BYTES)), ("label", pa.int16())])


@dataclass
class Dataset:
    path: Path  # the prepared directory
    classes: list[str]
    meta: dict = field(repr=False)  # meta.json
    # "train"/"test" -> (uint8 (N,32,32,3), int64 (N,)); images are read-only views on Arrow memory
    splits: dict[str, tuple[np.ndarray, np.ndarray]] = field(repr=False)

    @property
    def mean(self) -> tuple[float, float, float]:
        """Per-channel mean of the train split, 0-1 scale."""
        return tuple(self.meta["mean"])

    @property
    def std(self) -> tuple[float, float, float]:
        """Per-channel standard deviation of the train split, 0-1 scale."""
        return tuple(self.meta["std"])


def prepare(source: str, out: str | os.PathLike | None = None, *, resize: bool = False) -> Path:
    """Prepare SOURCE (see sources.py) and return the prepared directory.

    `out=None` uses the cache; a directory that already holds this dataset is returned as
    is. `resize` scales images that are not 32x32 instead of refusing them."""
    src = find_source(str(source), resize)
    if src.kind == "prepared":
        read_meta(src.path)
        return src.path if out is None else _copy(src.path, Path(out))
    key = _key(src, resize and src.kind == "images")
    dest = Path(out).expanduser() if out is not None else cache_home() / "prepared" / key
    if dest.exists() and not _is_empty_dir(dest) and _holds(dest, key):
        return dest  # read only: a read-only cache serves its hits
    check_writable_dir(dest, "--out" if out is not None else "cache ($CIFAR_RAY_HOME)")
    if dest.exists() and not _is_empty_dir(dest):
        if out is not None:
            raise UserError(f"{dest}: already exists and holds something else; "
                            f"choose another --out or remove it")
        shutil.rmtree(dest)  # a cache entry of an older format: rebuild it
    decoded = src.read()
    try:
        with atomic_dir(dest) as tmp:
            _write(tmp, decoded, src, key)
    except OSError as e:
        if _holds(dest, key):  # another process prepared the same source meanwhile
            return dest
        raise UserError(f"{dest}: cannot write the prepared dataset ({e.strerror or e}); "
                        "free some space or choose another --out") from None
    return dest


def load(source: str) -> Dataset:
    """Any SOURCE as arrays, preparing it into the cache first if need be."""
    path = prepare(source)
    meta = read_meta(path)
    splits = {name: _read_split(path / f"{name}.parquet", info["count"]) for name, info in meta["splits"].items()}
    for name, (_, y) in splits.items():
        if len(y) and not 0 <= y.min() <= y.max() < len(meta["classes"]):
            raise UserError(f"{path}: not a valid prepared dataset ({name}.parquet has labels "
                            f"outside the {len(meta['classes'])} classes); prepare it again from its source")
    return Dataset(path, list(meta["classes"]), meta, splits)


def read_meta(path: str | os.PathLike) -> dict:
    """meta.json of a prepared directory, after checking it against the Parquet files."""
    path = Path(path)

    def bad(what) -> UserError:
        what = " ".join(str(what).split())  # one line, whatever the library said
        return UserError(f"{path}: not a valid prepared dataset ({what}); prepare it again from its source")

    try:
        meta = json.loads((path / "meta.json").read_text())
    except (OSError, ValueError) as e:
        raise bad(f"meta.json: {getattr(e, 'strerror', None) or e}") from None
    if not isinstance(meta, dict) or meta.get("format_version") != FORMAT_VERSION:
        version = meta.get("format_version") if isinstance(meta, dict) else None
        raise bad(f"format version {version}, this cifar-ray reads version {FORMAT_VERSION}")
    missing = [key for key in ("classes", "splits", "mean", "std") if key not in meta]
    if missing or not isinstance(meta["splits"], dict) or not meta["splits"]:
        raise bad(f"meta.json lacks {', '.join(missing) or 'a split'}")
    classes, splits = meta["classes"], meta["splits"]
    if not (isinstance(classes, list) and len(classes) >= 2 and all(isinstance(c, str) for c in classes)):
        raise bad("meta.json: classes must be a list of at least 2 names")
    for key in ("mean", "std"):
        if not (isinstance(meta[key], list) and len(meta[key]) == 3
                and all(is_number(v) and 0 <= v <= 1 for v in meta[key])):
            raise bad(f"meta.json: {key} must be 3 numbers in [0, 1]")
    if not all(v > 0 for v in meta["std"]):
        raise bad("meta.json: std must be > 0")
    for name, info in splits.items():
        if name not in SPLIT_NAMES or not isinstance(info, dict) or not isinstance(info.get("count"), int) \
                or not isinstance(info.get("per_class"), dict) or set(info["per_class"]) != set(classes):
            raise bad(f"meta.json: split {shown(name)} must be train or test, with a count and a "
                      "per_class count of every class")
    for name, info in splits.items():
        file = path / f"{name}.parquet"
        try:
            pf = pq.ParquetFile(file)
        except (OSError, pa.ArrowException) as e:
            raise bad(f"{file.name}: {e}") from None
        if not pf.schema_arrow.equals(SCHEMA) or pf.metadata.num_rows != info.get("count"):
            raise bad(f"{file.name} does not match meta.json")
    return meta


# ---------------------------------------------------------------- writing

def _key(src: Source, resize: bool) -> str:
    recipe = f"cifar-ray v{FORMAT_VERSION}|{src.content_hash}|resize={resize}"
    return hashlib.sha256(recipe.encode()).hexdigest()[:24]


def _is_empty_dir(path: Path) -> bool:
    return path.is_dir() and not any(path.iterdir())


def _holds(path: Path, key: str) -> bool:
    try:
        return read_meta(path).get("key") == key
    except UserError:
        return False


def _write(folder: Path, decoded: Decoded, src: Source, key: str) -> None:
    classes = decoded.classes
    splits = {}
    with ThreadPoolExecutor(1) as thread:
        # numpy and Arrow release the GIL: the statistics and the Parquet writes overlap.
        # A test-only set (for evaluation) gets its own statistics; runs use the checkpoint's.
        stats = thread.submit(channel_stats, decoded.splits.get("train", decoded.splits.get("test"))[0])
        for name, (x, y) in decoded.splits.items():
            _write_split(folder / f"{name}.parquet", x, y)
            counts = np.bincount(y, minlength=len(classes))
            splits[name] = {"file": f"{name}.parquet", "count": int(len(y)),
                            "per_class": dict(zip(classes, counts.tolist()))}
        mean, std = stats.result()
    meta = {
        "format_version": FORMAT_VERSION,
        "key": key,
        "content_hash": src.content_hash,
        "source": src.description,
        "classes": classes,
        "splits": splits,
        "mean": mean,
        "std": std,
        "skipped_files": decoded.skipped,
    }
    (folder / "meta.json").write_text(json.dumps(meta, indent=1) + "\n")


def _write_split(path: Path, x: np.ndarray, y: np.ndarray) -> None:
    x = np.ascontiguousarray(x, np.uint8)
    images = pa.FixedSizeBinaryArray.from_buffers(pa.binary(IMAGE_BYTES), len(x), [None, pa.py_buffer(x)])
    table = pa.table([images, pa.array(y.astype(np.int16))], schema=SCHEMA)
    # Uncompressed, no dictionary, no statistics: raw pixels compress poorly, and this way
    # reading a split is one copy from the page cache.
    pq.write_table(table, path, compression="none", use_dictionary=False, write_statistics=False)


def channel_stats(x: np.ndarray) -> tuple[list[float], list[float]]:
    """Per-channel mean and std of uint8 HWC images on the 0-1 scale, exact.

    Sums over the contiguous (N, 3072) view are fast; uint16 holds 255**2, int64 the totals."""
    flat = x.reshape(len(x), -1)
    total = flat.sum(0, dtype=np.int64)
    squares = np.zeros(flat.shape[1], np.int64)
    buf = np.empty((min(len(flat), 4096), flat.shape[1]), np.uint16)
    for i in range(0, len(flat), len(buf)):
        part = buf[:len(flat[i:i + len(buf)])]
        np.square(flat[i:i + len(buf)], out=part, dtype=np.uint16)
        squares += part.sum(0, dtype=np.int64)
    n = len(x) * x.shape[1] * x.shape[2] * 255.0
    mean = total.reshape(-1, 3).sum(0) / n
    var = squares.reshape(-1, 3).sum(0) / (n * 255.0) - mean**2
    return [round(float(v), 6) for v in mean], [round(float(v), 6) for v in np.sqrt(np.maximum(var, 0))]


def _copy(path: Path, out: Path) -> Path:
    out = out.expanduser()
    if out.exists() and not _is_empty_dir(out):
        if out.resolve() == path:
            return out
        raise UserError(f"{out}: already exists; choose another --out or remove it")
    check_writable_dir(out, "--out")
    with atomic_dir(out) as tmp:
        for name in ["meta.json", *(f"{split}.parquet" for split in read_meta(path)["splits"])]:
            shutil.copy2(path / name, tmp / name)
    return out


# ---------------------------------------------------------------- reading

def _read_split(file: Path, count: int) -> tuple[np.ndarray, np.ndarray]:
    # ParquetFile, and buffers rather than to_numpy(): both pq.read_table and
    # ChunkedArray.to_numpy import pandas, which costs more than the read itself.
    table = pq.ParquetFile(file, memory_map=True).read()
    images, labels = (table.column(name).combine_chunks() for name in ("image", "label"))
    # The values buffer of a FixedSizeBinaryArray is the images back to back: a view.
    x = np.frombuffer(images.buffers()[1], np.uint8, count * IMAGE_BYTES, images.offset * IMAGE_BYTES)
    y = np.frombuffer(labels.buffers()[1], np.int16, count, labels.offset)
    return x.reshape(count, 32, 32, 3), y.astype(np.int64)


# ---------------------------------------------------------------- splits

def train_val_split(labels, val_fraction: float = 0.1, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Stratified, seeded split of train indices: (train_idx, val_idx), sorted int64 arrays,
    disjoint and covering all. Each class gives about `val_fraction` of its images to val."""
    labels = np.asarray(labels)
    if not 0 <= val_fraction < 1:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    val = stratified_subset(labels, round(len(labels) * val_fraction), seed)
    mask = np.ones(len(labels), bool)
    mask[val] = False
    return np.flatnonzero(mask).astype(np.int64), val


def stratified_subset(labels, n: int, seed: int = 0) -> np.ndarray:
    """`n` indices (sorted int64) whose class proportions match `labels`' (largest remainder)."""
    labels = np.asarray(labels)
    n = max(0, min(int(n), len(labels)))
    classes, counts = np.unique(labels, return_counts=True)
    quota = counts * n / max(len(labels), 1)
    take = np.floor(quota).astype(int)
    # Hand the leftover images to the classes with the largest fractional quota.
    take[np.argsort(take - quota, kind="stable")[: n - take.sum()]] += 1
    rng = np.random.default_rng(seed)
    picked = [rng.permutation(np.flatnonzero(labels == c))[:k] for c, k in zip(classes, take)]
    return np.sort(np.concatenate(picked or [np.empty(0, np.int64)])).astype(np.int64)

"""Turn a SOURCE string into decoded uint8 images + labels, and a content hash to cache by.

`resolve(spec)` is cheap: it reads the source's bytes (needed for the hash) but decodes
nothing, so a cache hit costs one read and one hash. `Source.read()` does the decoding.

Kinds of source:
- `cifar10`: the official tarball, downloaded into the cache with torchvision's utilities;
  a local copy of it; or its extracted `cifar-10-batches-py/` folder. These hold pickles, so
  nothing is unpickled before it has passed the official MD5 (the tarball's, or each batch
  file's, as torchvision's CIFAR10 class lists them).
- an ImageFolder: a directory, .tar, .tar.gz/.tgz or .zip of `<class>/<image>` (one split,
  train) or `train|test/<class>/<image>`, JPEG or PNG. Archives are read in memory, never
  extracted, and members with absolute paths, `..`, links or devices are refused.
- `synthetic[:N]`: see synthetic.py.
- a prepared dataset directory (holding meta.json): store.py handles it.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import multiprocessing
import os
import pickle
import re
import stat
import tarfile
import tempfile
import warnings
import zipfile
import zlib
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator

import numpy as np

from cifar_ray.data import synthetic
from cifar_ray.errors import UserError, quote
from cifar_ray.fsutil import refuse_special

SPLITS = ("train", "test")
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
ARCHIVE_SUFFIXES = (".tar", ".tar.gz", ".tgz", ".zip")
SOURCE_HELP = (
    "SOURCE may be cifar10 (download), synthetic or synthetic:N, a path to "
    "cifar-10-python.tar.gz or cifar-10-batches-py/, an ImageFolder directory, .tar, "
    ".tar.gz, .tgz or .zip, or a prepared dataset directory"
)
CHUNK = 2048  # images per decode task
# Pixels an image may have: every image becomes 32x32 anyway, and this holds an 8K frame
# (7680x4320). Beyond it, a small file would decode into gigabytes (PIL's generic limit,
# 89M with only a warning up to 179M, is far above what this tool needs).
MAX_PIXELS = 2**25
MAX_SYNTHETIC = 1_000_000  # synthetic:N images (3 GB of uint8 pixels)
# An archive is held in memory whole, decompressed. Images barely compress, so far more
# bytes out than in is a decompression bomb: refuse beyond this ratio (small ones pass).
MAX_EXPANSION = 100  # decompressed bytes per archive byte
MIN_EXPANSION_LIMIT = 256 * 1024**2  # bytes any archive may decompress to
CIFAR_FOLDER = "cifar-10-batches-py"


@dataclass
class Decoded:
    """A dataset in memory, before it is written."""

    classes: list[str]
    splits: dict[str, tuple[np.ndarray, np.ndarray]]  # uint8 (N,32,32,3), int64 (N,)
    skipped: int = 0  # files ignored because they are not JPEG/PNG (README, ...)


@dataclass
class Source:
    spec: str  # what the user wrote
    kind: str  # prepared | cifar10 | images | synthetic
    description: str  # for meta.json and `data info`
    content_hash: str  # "sha256:..." of the input bytes, or "md5:<official>" for CIFAR-10
    path: Path | None = None
    read: Callable[[], Decoded] = field(default=lambda: None, repr=False)


def resolve(spec: str, resize: bool = False) -> Source:
    """Identify SOURCE `spec` and hash its content; raise UserError if it is none of them."""
    if spec == "cifar10":
        return _official_download()
    if spec == "synthetic" or spec.startswith("synthetic:"):
        return _synthetic(spec)
    path = Path(spec).expanduser()
    if not path.exists():
        if "/" in spec or os.sep in spec or spec.lower().endswith(ARCHIVE_SUFFIXES):
            raise UserError(f"{spec}: no such file or directory; check the path")
        raise UserError(f"{spec}: unknown SOURCE; {SOURCE_HELP}")
    path = path.resolve()
    refuse_special(path)
    if path.is_dir():
        if (path / "meta.json").is_file():
            return Source(spec, "prepared", f"prepared dataset {path}", "", path)
        if (path / "batches.meta").is_file() or (path / CIFAR_FOLDER).is_dir():
            return _official_folder(path if (path / "batches.meta").is_file() else path / CIFAR_FOLDER)
        return _image_dir(path, resize)
    name = path.name.lower()
    if not name.endswith(ARCHIVE_SUFFIXES):
        raise UserError(f"{path}: not a supported file type; {SOURCE_HELP}")
    raw = _read_bytes(path)
    if name.endswith(".zip"):
        return _image_archive(path, raw, resize, _zip_entries)
    md5 = hashlib.md5(raw, usedforsecurity=False).hexdigest()
    if md5 == CIFAR10_TGZ_MD5:
        return _official_tarball(path, raw)
    if name == CIFAR10_TGZ or _first_member(raw).startswith(CIFAR_FOLDER):
        raise UserError(f"{path}: MD5 {md5} differs from the official CIFAR-10 tarball's ({CIFAR10_TGZ_MD5}), "
                        f"so the file is corrupt or modified and is not unpickled; download it again "
                        f"(cifar-ray data prepare cifar10)")
    return _image_archive(path, raw, resize, _tar_entries)


def _first_member(raw: bytes) -> str:
    """The name of a tar's first member ("" if unreadable): decompresses only its start."""
    try:
        with tarfile.open(fileobj=io.BytesIO(raw), mode="r:*") as tf:
            first = tf.next()
    except (tarfile.TarError, EOFError, OSError, zlib.error):
        return ""
    return first.name.removeprefix("./") if first else ""


# ---------------------------------------------------------------- official CIFAR-10

# The official files and MD5s, as torchvision's CIFAR10 class lists them (a test checks
# that they agree). Copied rather than imported: importing torchvision takes seconds, and
# the tarball MD5 is compared for every .tar.gz source, even on a cache hit.
CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
CIFAR10_TGZ = "cifar-10-python.tar.gz"
CIFAR10_TGZ_MD5 = "c58f30108f718f92721af3b95e74349a"
CIFAR10_TRAIN = ("data_batch_1", "data_batch_2", "data_batch_3", "data_batch_4", "data_batch_5")
CIFAR10_TEST = ("test_batch",)
CIFAR10_META = "batches.meta"
CIFAR10_FILE_MD5 = {
    "data_batch_1": "c99cafc152244af753f735de768cd75f",
    "data_batch_2": "d4bba439e000b95fd0a9bffe97cbabec",
    "data_batch_3": "54ebc095f3ab1f0389bbae665268c751",
    "data_batch_4": "634d18415352ddfa80567beed471001a",
    "data_batch_5": "482c414d41f54cd18b22e5b47cb7c3cb",
    "test_batch": "40351d587109b95175f43aff81a1287e",
    "batches.meta": "5ff9c542aee3614f3951f8cda6e48888",
}


def _official_source(path: Path | None, description: str, read) -> Source:
    # Every official copy holds the same images, so they share one cache entry.
    return Source("cifar10", "cifar10", description, f"md5:{CIFAR10_TGZ_MD5}", path, read)


def _official_download() -> Source:
    def read() -> Decoded:
        path = download_cifar10()
        raw = _read_bytes(path)
        if hashlib.md5(raw, usedforsecurity=False).hexdigest() != CIFAR10_TGZ_MD5:  # the bytes we unpickle
            raise UserError(f"{path}: MD5 differs from the official CIFAR-10 tarball's; delete it and run again")
        return _read_official_tarball(path, raw)

    return _official_source(None, f"official CIFAR-10 ({CIFAR10_URL})", read)


def download_cifar10() -> Path:
    """The official tarball in `<cache>/downloads/`, downloaded once, MD5 checked."""
    from torchvision.datasets.utils import check_integrity, download_url

    from cifar_ray.data.store import cache_home

    folder = cache_home() / "downloads"
    path = folder / CIFAR10_TGZ
    if check_integrity(path, CIFAR10_TGZ_MD5):
        return path
    folder.mkdir(parents=True, exist_ok=True)
    # Download into a temp folder and rename: an interrupted download leaves no partial file.
    with tempfile.TemporaryDirectory(dir=folder, prefix=".download-") as tmp:
        try:
            download_url(CIFAR10_URL, tmp, CIFAR10_TGZ, md5=CIFAR10_TGZ_MD5)
        except (OSError, RuntimeError) as e:  # URLError is an OSError; a bad MD5 a RuntimeError
            reason = getattr(e, "reason", None) or e
            raise UserError(
                f"cifar10: cannot download {CIFAR10_URL} ({reason}); check the internet "
                f"connection, or fetch {CIFAR10_TGZ} elsewhere and pass its path as SOURCE"
            ) from None
        os.replace(Path(tmp) / CIFAR10_TGZ, path)
    return path


def _official_tarball(path: Path, raw: bytes) -> Source:
    return _official_source(path, f"official CIFAR-10 tarball {path}",
                            lambda: _read_official_tarball(path, raw))


def _read_official_tarball(path: Path, raw: bytes) -> Decoded:
    # The caller checked the tarball's MD5, so its pickles are the official ones.
    files = {}
    for name, blob in _tar_entries(path, raw):
        if blob is not None:
            files[name.rsplit("/", 1)[-1]] = blob
    return _unpickle_batches(str(path), files)


def _official_folder(folder: Path) -> Source:
    def read() -> Decoded:
        files = {}
        for name, md5 in CIFAR10_FILE_MD5.items():
            blob = _read_bytes(folder / name)
            if hashlib.md5(blob, usedforsecurity=False).hexdigest() != md5:
                raise UserError(
                    f"{folder / name}: MD5 differs from the official CIFAR-10 file, so it is "
                    f"not unpickled; download the dataset again (cifar-ray data prepare cifar10)"
                )
            files[name] = blob
        return _unpickle_batches(str(folder), files)

    return _official_source(folder, f"official CIFAR-10 folder {folder}", read)


def _unpickle_batches(where: str, files: dict[str, bytes]) -> Decoded:
    """Official batches -> arrays. Only call with MD5-verified bytes: pickle runs code."""
    def batch(names):
        xs, ys = [], []
        for name in names:
            if name not in files:
                raise UserError(f"{where}: {name} is missing; download the dataset again")
            entry = pickle.loads(files[name], encoding="latin1")
            # Rows are 3072 bytes, channel-planar (R plane, G plane, B plane): to HWC.
            xs.append(np.asarray(entry["data"], np.uint8).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
            ys.append(np.asarray(entry["labels"], np.int64))
        return np.ascontiguousarray(np.concatenate(xs)), np.concatenate(ys)

    meta = pickle.loads(files[CIFAR10_META], encoding="latin1")
    return Decoded(list(meta["label_names"]), {"train": batch(CIFAR10_TRAIN), "test": batch(CIFAR10_TEST)})


# ---------------------------------------------------------------- synthetic

def _synthetic(spec: str) -> Source:
    n_train = 2000
    if spec != "synthetic":
        count = spec.partition(":")[2]
        if not count.isdigit() or not 10 <= int(count) <= MAX_SYNTHETIC:
            raise UserError(f"{spec}: expected synthetic:N with 10 <= N <= {MAX_SYNTHETIC:,} "
                            "train images, e.g. synthetic:5000")
        n_train = int(count)
    n_test, seed = 500, 0
    recipe = f"synthetic v{synthetic.VERSION}: {n_train} train + {n_test} test, seed {seed}"

    def read() -> Decoded:
        return Decoded(list(synthetic.CLASSES), synthetic.generate(n_train, n_test, seed))

    return Source(spec, "synthetic", recipe, "sha256:" + _sha256(recipe.encode()), None, read)


# ---------------------------------------------------------------- ImageFolder

def _image_dir(root: Path, resize: bool) -> Source:
    # Read every image once: the bytes give the content hash, and decoding reuses them.
    entries = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        rel = Path(dirpath).relative_to(root).as_posix()
        prefix = "" if rel == "." else rel + "/"
        if prefix:
            entries.append((prefix, None))
        for name in sorted(filenames):
            is_image = name.lower().endswith(IMAGE_SUFFIXES)
            entries.append((prefix + name, _read_bytes(Path(dirpath, name)) if is_image else b""))
    digest = hashlib.sha256()
    for name, blob in entries:  # relative paths + bytes: the same tree anywhere hashes the same
        digest.update(f"{name}\0{-1 if blob is None else len(blob)}\0".encode())
        digest.update(blob or b"")
    return Source(str(root), "images", f"ImageFolder directory {root}", "sha256:" + digest.hexdigest(),
                  root, lambda: _read_image_folder(str(root), entries, resize, f"{root}/"))


def _image_archive(path: Path, raw: bytes, resize: bool, entries_of) -> Source:
    kind = "zip" if entries_of is _zip_entries else "tar"
    return Source(str(path), "images", f"ImageFolder {kind} archive {path}", "sha256:" + _sha256(raw),
                  path, lambda: _read_image_folder(str(path), entries_of(path, raw), resize, f"{path}:"))


def _check_member(path: Path, name: str) -> None:
    if name.startswith(("/", "\\")) or name[1:2] == ":" or (".." in name and ".." in re.split(r"[\\/]", name)):
        raise UserError(f"{path}: member {name!r} has an absolute path or '..'; "
                        f"refusing the archive: repack it with relative paths")


def _refuse_member(path: Path, name: str, what: str) -> None:
    raise UserError(f"{path}: member {name!r} is a {what}; refusing the archive: "
                    f"repack it with regular files and folders only")


def _tar_entries(path: Path, raw: bytes) -> Iterator[tuple[str, bytes | None]]:
    """(name, bytes) per file and (name/, None) per folder of a .tar or .tar.gz, in order.

    We never extract to disk, so tarfile's extraction filter has nothing to guard; we refuse
    what filter="data" would (absolute paths, '..', devices) and any link. Member bytes are
    sliced from the decompressed archive: far cheaper than tarfile.extractfile per member.
    """
    try:
        buf = _gunzip(path, raw) if raw[:2] == b"\x1f\x8b" else raw
        members = _scan_plain_tar(buf)
        for name, is_dir, offset, size in _tarfile_members(path, buf) if members is None else members:
            _check_member(path, name)
            yield (name.rstrip("/") + "/", None) if is_dir else (name, buf[offset:offset + size])
    except (tarfile.TarError, EOFError, zlib.error, gzip.BadGzipFile) as e:
        raise UserError(f"{path}: truncated or corrupt archive ({e}); copy or download it again") from None


def _expansion_limit(raw: bytes) -> int:
    return max(MIN_EXPANSION_LIMIT, MAX_EXPANSION * len(raw))


def _bomb(path: Path, limit: int) -> UserError:
    return UserError(f"{path}: decompresses to more than {limit:,} bytes ({MAX_EXPANSION}x its "
                     "size): a decompression bomb, or not an archive of images; refusing it")


def _gunzip(path: Path, raw: bytes) -> bytes:
    """gzip.decompress, stopped at the expansion limit (a gzip file may hold several members)."""
    limit = _expansion_limit(raw)
    out, data = [], raw
    while data:
        d = zlib.decompressobj(wbits=31)
        out.append(d.decompress(data, limit + 1 - sum(map(len, out))))
        if sum(map(len, out)) > limit:
            raise _bomb(path, limit)
        if not d.eof:
            raise EOFError("compressed file ended before the end-of-stream marker was reached")
        data = d.unused_data.lstrip(b"\x00")  # gzip allows zero padding between members
    return b"".join(out)


def _tarfile_members(path: Path, buf: bytes) -> Iterator[tuple[str, bool, int, int]]:
    """(name, is folder, data offset, size) of each member, read by tarfile."""
    with tarfile.open(fileobj=io.BytesIO(buf), mode="r:") as tf:
        end = 0
        for m in tf:
            _check_member(path, m.name)
            if m.issym() or m.islnk():
                _refuse_member(path, m.name, "link")
            if not (m.isdir() or (m.isreg() and not m.issparse())):
                _refuse_member(path, m.name, "device or special file")
            if m.offset_data + m.size > len(buf):
                raise tarfile.ReadError(f"{m.name} is cut short")
            yield m.name, m.isdir(), m.offset_data, m.size
            end = m.offset_data + _padded(m.size)
    # tarfile takes a header cut short (or a bad one) for the end of the archive: a complete
    # archive ends with two zero blocks, so their absence means the file was damaged.
    if buf[end:end + 2 * BLOCK] != bytes(2 * BLOCK):
        raise tarfile.ReadError("the end-of-archive marker is missing")


BLOCK = tarfile.BLOCKSIZE  # 512: headers and data are laid out in blocks


def _padded(size: int) -> int:
    return -(-size // BLOCK) * BLOCK


def _scan_plain_tar(buf: bytes) -> list[tuple[str, bool, int, int]] | None:
    """The members of a tar holding only ustar/GNU headers of regular files and folders, like
    _tarfile_members; None for anything else (pax headers, long names, links, devices, a bad
    checksum, a missing end marker), which tarfile then reads and judges.

    Why: tarfile parses every header field in Python, ~30 us a member on our 2-core
    machine: 1.5-2 s of the 4 s budget for CIFAR's 50,000 members. This reads only the name,
    type and size, and checks all the checksums at once with numpy: ~10x faster."""
    members, headers, checksums, off = [], [], [], 0
    try:
        while True:
            header = buf[off:off + BLOCK]
            if len(header) < BLOCK:
                return None  # no end-of-archive marker: truncated
            if not any(header):  # the end: two zero blocks
                if any(buf[off:off + 2 * BLOCK]) or len(buf) < off + 2 * BLOCK:
                    return None
                break
            kind, magic = header[156], header[257:263]
            if magic not in (b"ustar\x00", b"ustar ") or kind not in b"05g\x00" or header[124] & 0x80:
                return None
            size = _octal(header[124:136])
            headers.append(off)
            checksums.append(_octal(header[148:156]))
            if kind == ord("g"):  # a pax global header, as `git archive` writes: a comment is harmless
                if set(re.findall(rb"\d+ ([^=]*)=", buf[off + BLOCK:off + BLOCK + size])) - {b"comment"}:
                    return None
            else:
                name = header[:100].split(b"\x00", 1)[0]
                if magic == b"ustar\x00" and header[345]:  # POSIX ustar: a path prefix
                    name = header[345:500].split(b"\x00", 1)[0] + b"/" + name
                if off + BLOCK + size > len(buf):
                    return None
                is_dir = kind == ord("5") or (kind == 0 and name.endswith(b"/"))
                members.append((name.decode("utf-8", "surrogateescape"), is_dir, off + BLOCK, size))
            off += BLOCK + _padded(size)
    except ValueError:  # a numeric field that is not octal
        return None
    # The checksum is the sum of the header's bytes, its own 8 counted as spaces.
    blocks = np.frombuffer(buf, np.uint8, len(buf) // BLOCK * BLOCK).reshape(-1, BLOCK)
    blocks = blocks[np.array(headers, np.int64) // BLOCK]
    sums = blocks.sum(1, dtype=np.int64) - blocks[:, 148:156].sum(1, dtype=np.int64) + 8 * ord(" ")
    return members if np.array_equal(sums, checksums) else None


def _octal(field: bytes) -> int:
    return int(field.strip(b" \x00") or b"0", 8)


def _zip_entries(path: Path, raw: bytes) -> Iterator[tuple[str, bytes | None]]:
    """Like _tar_entries for a .zip; zipfile checks each member's CRC as it reads it."""
    try:
        with zipfile.ZipFile(io.BytesIO(raw)) as zf:
            # zipfile stops each member at its declared size: the sum bounds what we read.
            limit = _expansion_limit(raw)
            if sum(info.file_size for info in zf.infolist()) > limit:
                raise _bomb(path, limit)
            for info in zf.infolist():
                _check_member(path, info.filename)
                kind = stat.S_IFMT(info.external_attr >> 16)  # Unix file type, if recorded
                if kind == stat.S_IFLNK:
                    _refuse_member(path, info.filename, "link")
                if kind not in (0, stat.S_IFREG, stat.S_IFDIR):
                    _refuse_member(path, info.filename, "device or special file")
                if info.is_dir():
                    yield info.filename, None
                else:
                    yield info.filename, zf.read(info)
    except (zipfile.BadZipFile, EOFError, zlib.error, NotImplementedError) as e:
        raise UserError(f"{path}: truncated or corrupt archive ({e}); copy or download it again") from None


def _read_image_folder(where: str, entries: Iterable[tuple[str, bytes | None]], resize: bool,
                       prefix: str) -> Decoded:
    """Decode an ImageFolder's images and label them by folder."""
    names, folders, skipped = [], [], 0

    def images():  # feeds the decoder while the archive is still being read
        nonlocal skipped
        for name, blob in entries:
            name = name.removeprefix("./")  # from `tar -C dir .`
            # Skip hidden files and folders, and macOS resource forks (._x.jpg is no image).
            if not name or "/." in "/" + name or "__MACOSX/" in name:
                continue
            parts = name.rstrip("/").split("/")
            if blob is None:
                folders.append(parts)
            elif name.lower().endswith(IMAGE_SUFFIXES):
                names.append(parts)
                yield prefix + name, blob
            else:
                skipped += 1

    pixels = decode_images(images(), resize)
    return _label(where, names, folders, pixels, skipped)


def _label(where, names, folders, pixels, skipped) -> Decoded:
    if not names:
        raise UserError(f"{where}: no JPEG or PNG images found; expected <class>/<image> "
                        f"or train|test/<class>/<image>")
    # Look through one wrapper folder that holds everything, e.g. "mydata/train/cat/1.png".
    while (all(len(p) >= 3 for p in names) and len({p[0] for p in names}) == 1
           and names[0][0] not in SPLITS):
        names = [p[1:] for p in names]
        folders = [p[1:] for p in folders if len(p) > 1]
    depths = {len(p) for p in names}
    if depths == {3} and all(p[0] in SPLITS for p in names):
        split_of = [p[0] for p in names]
        class_folders = [tuple(p) for p in folders if len(p) == 2 and p[0] in SPLITS]
    elif depths == {2}:
        split_of = ["train"] * len(names)
        names = [["train", *p] for p in names]
        class_folders = [("train", p[0]) for p in folders if len(p) == 1]
    else:
        example = "/".join(max(names, key=len))
        raise UserError(f"{where}: images must all sit at <class>/<image> or train|test/<class>/<image>, "
                        f"but found e.g. {example}; rearrange the folders")

    classes = {}
    for split in SPLITS:
        found = {p[1] for p in names if p[0] == split}
        empty = sorted({c for s, c in class_folders if s == split} - found)
        if empty:
            raise UserError(f"{where}: class folder {split}/{empty[0]} has no images; "
                            f"add JPEG or PNG images to it or remove it")
        if found:
            classes[split] = sorted(found)
    # A test/ split alone is a held-out set: it can be evaluated on, not trained on.
    names_of = classes.get("train") or classes["test"]
    if len(names_of) < 2:
        raise UserError(f"{where}: found {len(names_of)} class folder(s) "
                        f"({', '.join(names_of)}); need at least 2 <class>/ folders of images")
    if len(classes) == 2 and classes["test"] != classes["train"]:
        only_train = set(classes["train"]) - set(classes["test"])
        only_test = set(classes["test"]) - set(classes["train"])
        raise UserError(f"{where}: train and test have different classes (only in train: "
                        f"{', '.join(sorted(only_train)) or '-'}; only in test: "
                        f"{', '.join(sorted(only_test)) or '-'}); give both splits the same class folders")

    index = {c: i for i, c in enumerate(names_of)}
    paths = np.array(["/".join(p) for p in names])
    labels = np.array([index[p[1]] for p in names], np.int64)
    splits = {}
    for split in classes:
        # Sort by path, so the same tree as a folder, tar or zip gives the same dataset.
        idx = np.flatnonzero(np.array(split_of) == split)
        idx = idx[np.argsort(paths[idx], kind="stable")]
        in_order = len(idx) == len(pixels) and np.array_equal(idx, np.arange(len(idx)))
        splits[split] = (pixels if in_order else pixels[idx], labels[idx])  # skip a 150 MB copy
    return Decoded(names_of, splits, skipped)


# ---------------------------------------------------------------- decoding

def decode_images(items: Iterable[tuple[str, bytes]], resize: bool = False) -> np.ndarray:
    """Decode (name, bytes) pairs into one uint8 (N, 32, 32, 3) array, in order.

    A few thousand images decode here with PIL. Beyond one chunk, worker processes decode
    chunks while this process goes on reading the source, and JPEGs go through torchvision's
    batched libjpeg-turbo decoder (~4x faster than PIL per image here); its import costs
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


# ---------------------------------------------------------------- helpers

def _read_bytes(path: Path) -> bytes:
    refuse_special(path)
    try:
        return path.read_bytes()
    except OSError as e:
        raise UserError(f"{path}: cannot read ({e.strerror or e}); check the path and permissions") from None


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


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

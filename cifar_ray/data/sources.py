"""Turn a SOURCE string into decoded uint8 images + labels, and a content hash to cache by.

`find_source(spec)` is cheap: it reads the source's bytes (needed for the hash) but decodes
nothing, so a cache hit costs one read and one hash. `Source.read()` does the decoding.

Kinds of source:
- `cifar10`: the official tarball, downloaded into the cache with torchvision's utilities;
  a local copy of it; or its extracted `cifar-10-batches-py/` folder. These hold pickles, so
  nothing is unpickled before it has passed the official MD5 (the tarball's, or each batch
  file's, as torchvision's CIFAR10 class lists them).
- an ImageFolder: a directory, .tar, .tar.gz/.tgz or .zip of `<class>/<image>` (one split,
  train) or `train|test/<class>/<image>`, JPEG or PNG. Archives are read in memory, never
  extracted (archive.py); the images decode in decode.py.
- `synthetic[:N]`: see synthetic.py.
- a prepared dataset directory (holding meta.json): store.py handles it.
"""

from __future__ import annotations

import hashlib
import os
import pickle
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable

import numpy as np

from cifar_ray.data import synthetic
from cifar_ray.data.archive import first_member, tar_entries, zip_entries
from cifar_ray.data.decode import decode_images
from cifar_ray.errors import UserError
from cifar_ray.fsutil import refuse_special

SPLITS = ("train", "test")
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
ARCHIVE_SUFFIXES = (".tar", ".tar.gz", ".tgz", ".zip")
SOURCE_HELP = (
    "SOURCE may be cifar10 (download), synthetic or synthetic:N, a path to "
    "cifar-10-python.tar.gz or cifar-10-batches-py/, an ImageFolder directory, .tar, "
    ".tar.gz, .tgz or .zip, or a prepared dataset directory"
)
MAX_SYNTHETIC = 1_000_000  # synthetic:N images (3 GB of uint8 pixels)
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


def find_source(spec: str, resize: bool = False) -> Source:
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
        return _image_archive(path, raw, resize, zip_entries)
    md5 = hashlib.md5(raw, usedforsecurity=False).hexdigest()
    if md5 == CIFAR10_TGZ_MD5:
        return _official_tarball(path, raw)
    if name == CIFAR10_TGZ or first_member(raw).startswith(CIFAR_FOLDER):
        raise UserError(f"{path}: MD5 {md5} differs from the official CIFAR-10 tarball's ({CIFAR10_TGZ_MD5}), "
                        f"so the file is corrupt or modified and is not unpickled; download it again "
                        f"(cifar-ray data prepare cifar10)")
    return _image_archive(path, raw, resize, tar_entries)


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


def cache_home() -> Path:
    """Where downloads and prepared datasets are kept: $CIFAR_RAY_HOME, or ~/.cache/cifar-ray."""
    return Path(os.environ.get("CIFAR_RAY_HOME") or "~/.cache/cifar-ray").expanduser()


def download_cifar10() -> Path:
    """The official tarball in `<cache>/downloads/`, downloaded once, MD5 checked."""
    from torchvision.datasets.utils import check_integrity, download_url

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
    for name, blob in tar_entries(path, raw):
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
    kind = "zip" if entries_of is zip_entries else "tar"
    return Source(str(path), "images", f"ImageFolder {kind} archive {path}", "sha256:" + _sha256(raw),
                  path, lambda: _read_image_folder(str(path), entries_of(path, raw), resize, f"{path}:"))


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


# ---------------------------------------------------------------- helpers

def _read_bytes(path: Path) -> bytes:
    refuse_special(path)
    try:
        return path.read_bytes()
    except OSError as e:
        raise UserError(f"{path}: cannot read ({e.strerror or e}); check the path and permissions") from None


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()

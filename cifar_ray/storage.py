"""Where a run or a sweep lives: a local folder, or a URI that pyarrow.fs can open (s3://,
gs://, file://, hdfs://, ... with pyarrow's options in the query, e.g.
`s3://BUCKET/PREFIX?endpoint_override=host:9000&scheme=http` for an S3-compatible server).

Ray Train and Tune write checkpoints and experiment state into the location themselves
(`RunConfig(**loc.ray_storage())`). What the driver writes or reads itself goes through a
`Stage`: the folder itself when local; for a URI a local temp copy that `pull()` fills
(checkpoint payloads only on demand) and `push()` uploads from, one file per put, so a
reader of the store sees each file whole or not at all.

Every failure of the store (unknown scheme, no credentials, unreachable, no permission)
is a UserError naming the option it came from. No Ray imports.
"""

from __future__ import annotations

import contextlib
import fnmatch
import functools
import os
import posixpath
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator
from urllib.parse import urlsplit, urlunsplit

import pyarrow.fs as pafs

from cifar_ray.errors import UserError
from cifar_ray.fsutil import LOCK, atomic_write, check_writable_dir, claimed as _claimed

_URI = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*://")
BUCKET_SCHEMES = ("s3", "gs", "gcs", "abfs", "abfss")  # URIs whose first part is a bucket
LAZY = "state.pt"  # checkpoint payloads: pulled as empty stand-ins, fetched when read
# One filesystem per URI and process: S3's may have asked the bucket's region.
_from_uri = functools.lru_cache(maxsize=64)(pafs.FileSystem.from_uri)


def is_uri(text: str | os.PathLike) -> bool:
    return bool(_URI.match(str(text)))


def join(text: str, *parts: str) -> str:
    """A path or URI below `text` (a URI's ?options stay at the end)."""
    parts = tuple(p for p in parts if p)
    if not is_uri(text):
        return str(Path(text, *parts))
    s = urlsplit(text)
    return urlunsplit(s._replace(path=posixpath.join(s.path or "/", *parts)))


@dataclass(frozen=True)
class Location:
    """A folder: `text` as shown and passed on (an absolute path or the URI), and the same
    folder as pyarrow sees it (`fs`, `path`). `flag` names the option it came from."""
    text: str
    fs: pafs.FileSystem
    path: str
    flag: str = ""

    @property
    def remote(self) -> bool:
        return is_uri(self.text)

    def sub(self, *parts: str) -> "Location":
        parts = tuple(p for p in parts if p)
        return Location(join(self.text, *parts), self.fs, posixpath.join(self.path, *parts),
                        self.flag)

    def parent(self) -> "Location":
        s = urlsplit(self.text)
        text = urlunsplit(s._replace(path=posixpath.dirname(s.path))) if self.remote \
            else posixpath.dirname(self.text)
        return Location(text, self.fs, posixpath.dirname(self.path), self.flag)

    def ray_storage(self) -> dict:
        """RunConfig's storage arguments: a URI's filesystem goes to Ray as built here, so
        its query options (an endpoint, ...) reach every worker."""
        if not self.remote:
            return {"storage_path": self.path}
        return {"storage_path": self.path, "storage_filesystem": self.fs}

    def error(self, e: BaseException, doing: str) -> UserError:
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
        hint = ("; check the URI, the network and the credentials (AWS_* variables or "
                "profile, GOOGLE_APPLICATION_CREDENTIALS, or the node's cloud role)"
                if self.remote else "")
        return UserError(f"{self.flag} {self.text}: cannot {doing} ({reason}){hint}".strip())


def locate(text: str | os.PathLike, flag: str = "") -> Location:
    """Check a local path or URI and open its filesystem. (No request is made, except that
    pyarrow asks S3 for the bucket's region unless the URI gives `?region=` or an
    `endpoint_override`.)"""
    text = str(text)
    if not is_uri(text):
        path = str(Path(text).expanduser().resolve())
        return Location(path, pafs.LocalFileSystem(), path, flag)
    where = f"{flag} {text}".strip()
    s = urlsplit(text)
    if s.scheme in BUCKET_SCHEMES and not s.path.strip("/"):  # before pyarrow asks for its region
        raise UserError(f"{where}: give a folder inside the bucket, e.g. "
                        f"{s.scheme}://{s.hostname or 'BUCKET'}/cifar-ray/NAME")
    try:
        fs, path = _from_uri(text)
    except ValueError as e:  # pyarrow.ArrowInvalid: a scheme or option it does not know
        scheme = text.split("://", 1)[0]
        reason = (str(e).splitlines() or [""])[0]
        if reason.startswith("Unrecognized filesystem type"):
            reason = f"unknown storage scheme {scheme}://"
        raise UserError(f"{where}: {reason}; use a local path or a URI pyarrow.fs opens "
                        "(s3://BUCKET/PREFIX, gs://BUCKET/PREFIX, file:///PATH, ...)") from None
    except OSError as e:  # e.g. hdfs:// without its client library
        raise Location(text, pafs.LocalFileSystem(), "", flag).error(e, "open the storage") from None
    path = path.rstrip("/")
    if not path.strip("/"):
        raise UserError(f"{where}: give a folder, not the root of the store")
    return Location(urlunsplit(s._replace(path=s.path.rstrip("/"))), fs, path, flag)


# ---------------------------------------------------------------- reading and writing

def exists(loc: Location, rel: str = "") -> bool:
    try:
        return loc.fs.get_file_info(loc.sub(rel).path).type != pafs.FileType.NotFound
    except OSError as e:
        raise loc.error(e, "read the storage") from None


def entries(loc: Location) -> list[str]:
    """The names in the folder (none if it does not exist; a file: its own name), less our
    lock (fsutil.claimed)."""
    try:
        info = loc.fs.get_file_info(loc.path)
        if info.type == pafs.FileType.NotFound:
            return []
        if info.type == pafs.FileType.File:
            return [posixpath.basename(loc.path)]
        listed = loc.fs.get_file_info(pafs.FileSelector(loc.path, recursive=False))
    except OSError as e:
        raise loc.error(e, "read the storage") from None
    return sorted(n for n in (posixpath.basename(i.path) for i in listed) if n != LOCK)


def is_empty(loc: Location) -> bool:
    """True when the folder does not exist or holds nothing (but our lock)."""
    return not entries(loc)


def files(loc: Location) -> list[str]:
    """Every file below the folder, as paths relative to it (none if it does not exist)."""
    try:
        infos = loc.fs.get_file_info(pafs.FileSelector(loc.path, recursive=True,
                                                       allow_not_found=True))
    except OSError as e:
        raise loc.error(e, "list the storage") from None
    return sorted(posixpath.relpath(i.path, loc.path) for i in infos
                  if i.type == pafs.FileType.File)


def read_bytes(loc: Location, rel: str) -> bytes:
    try:
        with loc.fs.open_input_stream(loc.sub(rel).path) as f:
            return f.read()
    except FileNotFoundError:
        raise UserError(f"{loc.flag} {loc.sub(rel).text}: no such file".strip()) from None
    except OSError as e:
        raise loc.error(e, f"read {rel}") from None


def write(loc: Location, rel: str, data: bytes | str) -> None:
    """One file, whole or not at all: a temp file and a rename on a local disk, a single
    upload on an object store (an object appears only once its upload completes)."""
    data = data.encode() if isinstance(data, str) else data
    path = loc.sub(rel).path
    try:
        if isinstance(loc.fs, pafs.LocalFileSystem):
            atomic_write(path, data)
            return
        with loc.fs.open_output_stream(path) as f:
            f.write(data)
    except OSError as e:
        raise loc.error(e, f"write {rel}") from None


@dataclass(frozen=True)
class Kind:
    """What cifar-ray writes into a folder of one kind (a run, a sweep): `--overwrite` may
    replace such a folder, and only such a folder."""
    what: str  # "run", "sweep"
    markers: tuple[str, ...]  # one of these names says the folder is one
    names: tuple[str, ...]  # every top-level name (fnmatch pattern) cifar-ray may write

    def foreign(self, names: list[str]) -> list[str]:
        """Names cifar-ray did not write (all of them when no marker is there)."""
        if not any(m in names for m in self.markers):
            return names
        return [n for n in names if not any(fnmatch.fnmatchcase(n, p) for p in self.names)]


def check_new(loc: Location, overwrite: bool, kind: Kind, resume_hint: str,
              keep: tuple = ()) -> None:
    """Refuse, touching nothing, an --out folder that cannot be written, that holds a
    `kind` folder (unless `overwrite`: `resume_hint` says how to continue it instead), or
    that holds anything else: --overwrite never deletes what cifar-ray did not write, nor
    a folder holding the current directory or a path of `keep` (the --data source, ...)."""
    if not loc.remote:
        check_writable_dir(loc.path, "--out", loc.text)
    names = entries(loc)
    if not names:
        return
    foreign = kind.foreign(names)
    if foreign:
        shown = ", ".join(foreign[:3]) + (f" and {len(foreign) - 3} more" if len(foreign) > 3 else "")
        raise UserError(f"--out {loc.text}: holds files cifar-ray did not write ({shown}); "
                        "choose another folder (a new or an empty one)")
    if not overwrite:
        raise UserError(f"--out {loc.text}: holds another {kind.what}; pass {resume_hint} to "
                        "continue it, --overwrite to replace it, or choose another folder")
    if not loc.remote:
        here = Path(loc.path)
        for path in (Path.cwd(), *(k for k in keep if k and not is_uri(k) and Path(k).exists())):
            path = Path(path).resolve()
            if path == here or here in path.parents:
                raise UserError(f"--out {loc.text} --overwrite: the folder holds {path}, which "
                                "must not be deleted; choose another folder")


def make_new(loc: Location) -> None:
    """The folder, empty: what it held is removed (check_new has allowed that), our lock
    excepted."""
    if loc.remote:
        if not is_empty(loc):
            remove(loc)
        return
    Path(loc.path).mkdir(parents=True, exist_ok=True)
    for name in entries(loc):
        remove(loc.sub(name))


def claimed(loc: Location):
    """Hold a local folder for this process while the block runs (fsutil.claimed); the
    folder is checked for writing first. A bucket has no such lock: nothing is held."""
    if loc.remote:
        return contextlib.nullcontext()
    check_writable_dir(loc.path, loc.flag, loc.text)
    return _claimed(loc.path, loc.flag)


def download(loc: Location, rel: str, dest: Path) -> None:
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        pafs.copy_files(loc.sub(rel).path, str(dest), source_filesystem=loc.fs,
                        destination_filesystem=pafs.LocalFileSystem())
    except OSError as e:
        raise loc.error(e, f"download {rel}") from None


def remove(loc: Location) -> None:
    """Delete the folder and everything in it (nothing if it does not exist)."""
    try:
        kind = loc.fs.get_file_info(loc.path).type
        if kind == pafs.FileType.File:
            loc.fs.delete_file(loc.path)
        elif kind == pafs.FileType.Directory:
            loc.fs.delete_dir(loc.path)
    except OSError as e:
        raise loc.error(e, "delete what it holds") from None


# ---------------------------------------------------------------- a local stage

class Stage:
    """A local folder for what the driver reads and writes of `loc`: the folder itself
    when local; for a URI a temp folder (named like the remote one) deleted on exit.

    `pull()` makes the temp folder a copy of the remote one (with `lazy`, each checkpoint's
    state.pt is an empty stand-in until `fetch` downloads it); `push()` uploads the
    top-level files written or changed since the last pull or push, each in one put. Both
    do nothing for a local folder."""

    def __init__(self, loc: Location):
        self.loc = loc
        self._tmp = tempfile.mkdtemp(prefix="cifar-ray-stage-") if loc.remote else None
        self.local = Path(self._tmp, posixpath.basename(loc.path)) if self._tmp else Path(loc.path)
        if self._tmp:
            self.local.mkdir()
        self._seen: dict[str, tuple] = {}

    def __enter__(self) -> "Stage":
        return self

    def __exit__(self, kind, error, tb) -> None:
        if self._tmp is None:
            return
        shutil.rmtree(self._tmp, ignore_errors=True)
        if isinstance(error, UserError) and str(self.local) in str(error):
            # A message about a file of the stage names it as it is in the store.
            here = re.compile(re.escape(str(self.local)) + r"(/[^\s:;,()'\"]*)?")
            raise UserError(here.sub(lambda m: self.loc.sub((m[1] or "").lstrip("/")).text,
                                     str(error))) from None

    def _state(self) -> dict[str, tuple]:
        return {p.name: (p.stat().st_mtime_ns, p.stat().st_size)
                for p in self.local.iterdir() if p.is_file()}

    def pull(self, lazy: bool = True) -> None:
        if self._tmp is None:
            return
        listed = files(self.loc)
        shutil.rmtree(self.local)  # a mirror: what the store no longer holds goes too
        self.local.mkdir()
        for rel in listed:
            dest = self.local / rel
            if lazy and posixpath.basename(rel) == LAZY:
                dest.parent.mkdir(parents=True, exist_ok=True)
                dest.write_bytes(b"")  # a stand-in: read it through fetch()
            else:
                download(self.loc, rel, dest)
        self._seen = self._state()

    def fetch(self, path: Path) -> Path:
        """A file of the stage with its real content (a stand-in is downloaded)."""
        if self._tmp is not None and Path(path).stat().st_size == 0:
            download(self.loc, self._rel(path), Path(path))
        return Path(path)

    def shown(self, path: Path) -> str:
        """How to name a file of the stage to the user: its path or URI in the store."""
        return self.loc.sub(self._rel(path)).text if self._tmp else str(path)

    def _rel(self, path: Path) -> str:
        return Path(path).resolve().relative_to(self.local.resolve()).as_posix()

    def push(self) -> None:
        if self._tmp is None:
            return
        now = self._state()
        for name, stamp in sorted(now.items()):
            if self._seen.get(name) != stamp:
                write(self.loc, name, (self.local / name).read_bytes())
        self._seen = now


@contextlib.contextmanager
def local_copy(text: str, what: str = "run directory or checkpoint") -> Iterator[tuple[Path, Stage]]:
    """A local path standing for the folder or file `text`, and the stage it lies in: the
    path itself, or for a URI a downloaded copy (checkpoints included) whose changed
    top-level files `stage.push()` uploads."""
    loc = locate(text)
    if not loc.remote:
        yield Path(text), Stage(loc)
        return
    try:
        kind = loc.fs.get_file_info(loc.path).type
    except OSError as e:
        raise loc.error(e, "read the storage") from None
    if kind == pafs.FileType.NotFound:
        raise UserError(f"{text}: no such {what}")
    name = ""
    if kind == pafs.FileType.File:
        loc, name = loc.parent(), posixpath.basename(loc.path)
    with Stage(loc) as stage:
        stage.pull(lazy=False)
        yield (stage.local / name if name else stage.local), stage

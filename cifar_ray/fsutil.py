"""Atomic writes: a reader (or a process killed mid-write) sees the old state or the new one,
never half of it. Every file the package writes goes through here.

Files are flushed to disk before the rename and the rename itself is synced, so a machine
that loses power (a preempted VM) keeps the old or the new state too. The results get the
usual permissions (0666/0777 less the umask), not the private ones of a temp file."""

from __future__ import annotations

import contextlib
import glob
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Iterator

from cifar_ray import faults
from cifar_ray.errors import UserError

STALE_S = 3600.0  # a temp folder older than this was left by a killed writer


def _umask() -> int:
    try:
        with open("/proc/self/status") as f:  # Linux: read it without setting it
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


_UMASK = _umask()


def _fsync_dir(path: Path) -> None:
    """Make a rename in `path` durable (some filesystems cannot sync a folder: skipped)."""
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)



def _cannot_write(path: Path, e: OSError) -> UserError:
    return UserError(f"{path}: cannot write ({e.strerror or e}); choose another path or "
                     "check its permissions")


def check_writable_dir(path: str | os.PathLike, what: str, given: str | os.PathLike | None = None) -> None:
    """Refuse, before any work starts, a folder to be written that cannot be: a file in
    its place or among its parents, or a parent that is not writable. Creates nothing.
    `what` and `given` name the option and its value in messages (default: the folder)."""
    path = Path(path).expanduser()
    flag = f"{what} {given if given is not None else path}"
    existing = path
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise UserError(f"{flag}: {existing} is a file, not a folder; give another path")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise UserError(f"{flag}: {existing} is not writable; give a folder you may write to")


def atomic_write(path: str | os.PathLike, data: bytes | str) -> None:
    """Write `data` to `path` via a temp file in the same folder and a rename."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as e:  # a file where a folder should be, no permission, ...
        raise _cannot_write(path, e) from None
    try:
        with os.fdopen(fd, "wb") as f:
            with contextlib.suppress(OSError):  # a filesystem without modes keeps its own
                os.fchmod(f.fileno(), 0o666 & ~_UMASK)
            f.write(data.encode() if isinstance(data, str) else data)
            f.flush()
            os.fsync(f.fileno())
        faults.point("atomic-write", name=path.name)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temp folder beside `path`; on success rename it to `path`, else delete it.

    `path` must not exist yet (callers decide what an existing one means). Temp folders
    that killed writers left beside `path` more than STALE_S ago are removed first."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        for old in glob.glob(glob.escape(str(path.parent / f".{path.name}.")) + "*.tmp"):
            with contextlib.suppress(OSError):
                if time.time() - os.stat(old).st_mtime > STALE_S:
                    shutil.rmtree(old)
        tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp"))
    except OSError as e:
        raise _cannot_write(path, e) from None
    try:
        with contextlib.suppress(OSError):
            os.chmod(tmp, 0o777 & ~_UMASK)
        yield tmp
        for file in tmp.rglob("*"):
            if file.is_file():
                with open(file, "rb") as f:
                    os.fsync(f.fileno())
        _fsync_dir(tmp)
        faults.point("atomic-dir", name=path.name)
        os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _fsync_dir(path.parent)

"""Atomic writes: a reader (or a process killed mid-write) sees the old state or the new one,
never half of it. Every file the package writes goes through here."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

from cifar_ray.errors import UserError


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
            f.write(data.encode() if isinstance(data, str) else data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temp folder beside `path`; on success rename it to `path`, else delete it.

    `path` must not exist yet (callers decide what an existing one means)."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp"))
    except OSError as e:
        raise _cannot_write(path, e) from None
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise

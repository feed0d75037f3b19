"""Atomic writes: a reader (or a process killed mid-write) sees the old state or the new one,
never half of it. Every file the package writes goes through here.

Files are flushed to disk before the rename and the rename itself is synced, so a machine
that loses power (a preempted VM) keeps the old or the new state too. The results get the
usual permissions (0666/0777 less the umask), not the private ones of a temp file."""

from __future__ import annotations

import contextlib
import errno
import glob
import json
import os
import shutil
import socket
import sys
import tempfile
import time
from pathlib import Path
from typing import Iterator

from cifar_ray import faults
from cifar_ray.errors import UserError

STALE_S = 3600.0  # a temp folder older than this was left by a killed writer
LOCK = ".cifar-ray.lock"  # in a run or sweep folder while a cifar-ray process writes it


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



def _cannot_write(path: Path, e: OSError, size: int | None = None) -> UserError:
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        return out_of_space(path, size)
    return UserError(f"{path}: cannot write ({e.strerror or e}); choose another path or "
                     "check its permissions")


def out_of_space(path: str | os.PathLike, size: int | None = None, then: str = "") -> UserError:
    """The one line for a full disk (or quota): the path, the bytes it needed, what is free."""
    folder = Path(path)
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    try:
        free = f", {shutil.disk_usage(folder).free:,} bytes free"
    except OSError:
        free = ""
    need = f" for {size:,} bytes" if size else ""
    return UserError(f"{path}: no space left on the device{need}{free}; free some space"
                     f"{then or ' and run the command again'}")


def is_out_of_space(error: BaseException | None) -> bool:
    """True when `error`, or any exception it was raised from, is a full disk or quota
    (Ray and pyarrow wrap the OSError; the text is all some of them keep)."""
    seen, todo = set(), [error]
    while todo:
        error = todo.pop()
        if error is None or id(error) in seen:
            continue
        seen.add(id(error))
        if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if "No space left on device" in str(error) or "Disk quota exceeded" in str(error):
            return True
        todo += [error.__cause__, error.__context__,  # Ray Train: each worker's exception
                 *getattr(error, "worker_failures", {}).values()]
    return False


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


def refuse_special(path: str | os.PathLike) -> None:
    """Refuse, without opening it, a path that exists but is neither a folder nor a regular
    file: reading a FIFO waits for a writer for ever, a device never ends."""
    import stat

    try:
        mode = os.stat(path).st_mode
    except OSError:
        return  # missing or unreadable: the caller's own error says so
    if not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):
        raise UserError(f"{path}: not a regular file (a FIFO, device or socket), so it is not "
                        "read; give a file")


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
    except OSError as e:
        Path(tmp).unlink(missing_ok=True)
        raise _cannot_write(path, e, len(data)) from None
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
    except OSError as e:  # pyarrow's errors for a full disk are OSErrors without an errno
        shutil.rmtree(tmp, ignore_errors=True)
        if is_out_of_space(e):
            raise out_of_space(path) from None
        raise
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _fsync_dir(path.parent)


# ---------------------------------------------------------------- one writer per folder

@contextlib.contextmanager
def claimed(path: str | os.PathLike, flag: str) -> Iterator[None]:
    """Hold the folder `path` for this process while the block runs: a second cifar-ray
    that wants to write it (same machine, or another one sharing the folder over NFS) is
    refused with one line naming the holder. The hold is a lock (flock) on `path`/LOCK,
    which the kernel drops when the process ends, however it ends: a killed run leaves no
    stale claim. Folders created here are removed again if the block leaves them empty."""
    import fcntl

    path = Path(path)
    made, missing = [], path
    while not missing.exists() and missing != missing.parent:
        made.insert(0, missing)
        missing = missing.parent
    lock = path / LOCK
    try:
        for folder in made:
            folder.mkdir()
        while True:
            fd = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o666 & ~_UMASK)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                owner = os.read(fd, 1000).decode(errors="replace")
                os.close(fd)
                raise UserError(f"{flag} {path}: another cifar-ray is writing this folder "
                                f"({_owner_text(owner)}); wait for it to end or choose another "
                                "folder") from None
            except OSError:  # a filesystem without locks: nothing better to do than go on
                break
            try:  # the previous holder may have removed the file between our open and lock
                if os.stat(lock).st_ino == os.fstat(fd).st_ino:
                    break
            except FileNotFoundError:
                pass
            os.close(fd)
        os.ftruncate(fd, 0)
        os.write(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                                 "since": time.strftime("%Y-%m-%d %H:%M:%S"),
                                 "command": " ".join(["cifar-ray", *sys.argv[1:]])[:300]}).encode())
    except UserError:
        _remove_empty(made)
        raise
    except OSError as e:
        _remove_empty(made)
        raise _cannot_write(lock, e) from None
    try:
        faults.point("claimed", name=path.name)
        yield
    finally:
        with contextlib.suppress(OSError):
            lock.unlink()
        os.close(fd)
        _remove_empty(made)


def _owner_text(owner: str) -> str:
    try:
        o = json.loads(owner)
        return f"PID {o['pid']} on {o['host']} since {o['since']}: {o['command']}"
    except (ValueError, KeyError, TypeError):
        return "its owner did not say who it is"


def _remove_empty(folders: list[Path]) -> None:
    for folder in reversed(folders):
        with contextlib.suppress(OSError):
            folder.rmdir()

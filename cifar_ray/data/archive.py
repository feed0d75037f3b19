"""Safe reading of untrusted .tar, .tar.gz/.tgz and .zip archives, in memory.

An archive is never extracted: its members come out as (name, bytes) pairs. Members with an
absolute path or `..`, links, devices and other special files are refused, and so is a
decompression bomb, each with one line naming the archive and the member. tarfile and
zipfile are the only parsers.
"""

from __future__ import annotations

import gzip
import io
import re
import stat
import tarfile
import zipfile
import zlib
from pathlib import Path
from typing import Iterator

from cifar_ray.errors import UserError

# An archive is held in memory whole, decompressed. Images barely compress, so far more
# bytes out than in is a decompression bomb: refuse beyond this ratio (small ones pass).
MAX_EXPANSION = 100  # decompressed bytes per archive byte
MIN_EXPANSION_LIMIT = 256 * 1024**2  # bytes any archive may decompress to
BLOCK = tarfile.BLOCKSIZE  # 512: tar headers and data are laid out in blocks


def tar_entries(path: Path, raw: bytes) -> Iterator[tuple[str, bytes | None]]:
    """(name, bytes) per file and (name/, None) per folder of a .tar or .tar.gz, in order.

    tarfile reads the headers. Nothing is extracted, so tarfile's extraction filter has
    nothing to guard: we refuse what filter="data" would (absolute paths, '..', devices)
    and any link. Member bytes are sliced from the decompressed archive: far cheaper than
    tarfile.extractfile per member.
    """
    try:
        buf = _gunzip(path, raw) if raw[:2] == b"\x1f\x8b" else raw
        end = 0
        with tarfile.open(fileobj=io.BytesIO(buf), mode="r:") as tf:
            for m in tf:
                _check_name(path, m.name)
                if m.issym() or m.islnk():
                    _refuse(path, m.name, "link")
                if not (m.isdir() or (m.isreg() and not m.issparse())):
                    _refuse(path, m.name, "device or special file")
                if m.offset_data + m.size > len(buf):
                    raise tarfile.ReadError(f"{m.name} is cut short")
                if m.isdir():
                    yield m.name.rstrip("/") + "/", None  # (a GNU long name keeps its slash)
                else:
                    yield m.name, buf[m.offset_data:m.offset_data + m.size]
                end = m.offset_data + -(-m.size // BLOCK) * BLOCK
        # tarfile takes a header cut short (or a bad one) for the end of the archive: a
        # complete archive ends with two zero blocks, so their absence means it was damaged.
        if buf[end:end + 2 * BLOCK] != bytes(2 * BLOCK):
            raise tarfile.ReadError("the end-of-archive marker is missing")
    except (tarfile.TarError, EOFError, zlib.error, gzip.BadGzipFile) as e:
        raise UserError(f"{path}: truncated or corrupt archive ({e}); copy or download it again") from None


def zip_entries(path: Path, raw: bytes) -> Iterator[tuple[str, bytes | None]]:
    """Like tar_entries for a .zip; zipfile checks each member's CRC as it reads it."""
    try:
        with zipfile.ZipFile(io.BytesIO(raw)) as zf:
            # zipfile stops each member at its declared size: the sum bounds what we read.
            limit = _expansion_limit(raw)
            if sum(info.file_size for info in zf.infolist()) > limit:
                raise _bomb(path, limit)
            for info in zf.infolist():
                _check_name(path, info.filename)
                kind = stat.S_IFMT(info.external_attr >> 16)  # Unix file type, if recorded
                if kind == stat.S_IFLNK:
                    _refuse(path, info.filename, "link")
                if kind not in (0, stat.S_IFREG, stat.S_IFDIR):
                    _refuse(path, info.filename, "device or special file")
                if info.is_dir():
                    yield info.filename, None
                else:
                    yield info.filename, zf.read(info)
    except (zipfile.BadZipFile, EOFError, zlib.error, NotImplementedError) as e:
        raise UserError(f"{path}: truncated or corrupt archive ({e}); copy or download it again") from None


def first_member(raw: bytes) -> str:
    """The name of a tar's first member ("" if unreadable): decompresses only its start."""
    try:
        with tarfile.open(fileobj=io.BytesIO(raw), mode="r:*") as tf:
            first = tf.next()
    except (tarfile.TarError, EOFError, OSError, zlib.error):
        return ""
    return first.name.removeprefix("./") if first else ""


def _check_name(path: Path, name: str) -> None:
    if name.startswith(("/", "\\")) or name[1:2] == ":" or (".." in name and ".." in re.split(r"[\\/]", name)):
        raise UserError(f"{path}: member {name!r} has an absolute path or '..'; "
                        f"refusing the archive: repack it with relative paths")


def _refuse(path: Path, name: str, what: str) -> None:
    raise UserError(f"{path}: member {name!r} is a {what}; refusing the archive: "
                    f"repack it with regular files and folders only")


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

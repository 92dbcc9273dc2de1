"""Crash-safe writes: a file appears under its real name complete, or not at all.

Every writer in hpctrain (checkpoints, step logs, shards, scores, reports, job scripts) writes a
temp file next to its target and renames it over the target. A failure removes the temp file,
and a full disk (or quota) becomes one line naming the file and the free space there, so the
previous files stay intact and the disk does not stay full of a half-written one.
"""
from __future__ import annotations

import contextlib
import datetime as _dt
import errno
import os
import shutil
from pathlib import Path
from typing import Iterator

from hpctrain.errors import UserError

_FULL = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


class DiskFull(UserError):
    """A write ran out of space: one line naming the path and the free space."""


def free_space(path: Path) -> str:
    """Free space where `path` lives, human-readable ("unknown" if it cannot be read)."""
    path = Path(path)
    while not path.exists() and path != path.parent:
        path = path.parent
    try:
        free = float(shutil.disk_usage(path).free)
    except OSError:
        return "unknown"
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if free < 1024 or unit == "TiB":
            return f"{free:.0f} {unit}" if unit == "B" else f"{free:.1f} {unit}"
        free /= 1024
    return "unknown"


def is_disk_full(exc: BaseException) -> bool:
    """An exception that means the disk (or quota) is full; torch and h5py wrap the OSError."""
    for e in (exc, exc.__cause__, exc.__context__):
        if isinstance(e, OSError) and e.errno in _FULL:
            return True
    text = str(exc)
    return any(s in text for s in ("No space left", "Disk quota exceeded", "file write failed",
                                   "File too large", "errno = 28"))


def disk_full(path: Path) -> DiskFull:
    return DiskFull(f"disk full writing {path} ({free_space(path)} free there); the previous files "
                    f"are intact and the partial one was removed: free some space, then run again with "
                    f"--resume=auto")


def temp_name(path: Path) -> Path:
    """The temp file `replacing` writes for `path` (hidden, per process)."""
    return path.with_name(f".{path.name}.tmp{os.getpid()}")


@contextlib.contextmanager
def replacing(path: Path, fsync: bool = False, mode: int | None = None) -> Iterator[Path]:
    """Yield a temp path next to `path` to write; after the block it replaces `path` (fsynced
    first with `fsync`, given `mode`). On failure the temp file is removed; a full disk is a
    one-line `DiskFull`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_name(path)
    try:
        yield tmp
        if fsync:
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
        if mode is not None:
            os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException as exc:
        tmp.unlink(missing_ok=True)
        if isinstance(exc, Exception) and is_disk_full(exc):
            raise disk_full(path) from None
        raise


def write_atomic(path: Path, data: bytes | str, mode: int | None = None) -> Path:
    """`data` as the whole content of `path`, atomically."""
    with replacing(path, mode=mode) as tmp:
        tmp.write_bytes(data.encode() if isinstance(data, str) else data)
    return Path(path)


def rename_aside(path: Path, label: str) -> Path:
    """Rename `path` to a new sibling `<stem>.<label>-<UTC time><suffix>` (a directory: its whole
    name before the label); never deleted; returns the new path."""
    path = Path(path)
    stem, suffix = (path.name, "") if path.is_dir() else (path.stem, path.suffix)
    stamp = _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    target, n = path.with_name(f"{stem}.{label}-{stamp}{suffix}"), 1
    while target.exists():
        n += 1
        target = path.with_name(f"{stem}.{label}-{stamp}-{n}{suffix}")
    os.rename(path, target)
    return target

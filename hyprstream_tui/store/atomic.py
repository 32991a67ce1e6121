"""Crash-safe file writes: temp name, fsync, os.replace, fsync of the folder.

A reader (or a process started after a SIGKILL) sees either the old file or the new one, never a
half-written one. Temp files end in `.incomplete` and are removed on any failure.
"""

from __future__ import annotations

import errno
import os
import uuid
from pathlib import Path

from hyprstream_tui.errors import StorageError, disk_full, is_disk_full

TMP_SUFFIX = ".incomplete"


def tmp_name(path: Path) -> Path:
    return path.with_name(f".{path.name}.{uuid.uuid4().hex[:12]}{TMP_SUFFIX}")


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def disk_error(exc: OSError, what: str) -> StorageError:
    """Turn an OSError into one clear line; ENOSPC/EFBIG get their own advice."""
    if is_disk_full(exc):  # also libgit2's errno-less OSError "failed to write out file: File too large"
        return disk_full(what)
    if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return StorageError(f"Permission denied while {what} ({exc.filename}): check the folder's permissions.")
    return StorageError(f"Could not finish {what}: {exc.strerror or exc} ({exc.filename or ''}).")


def write_bytes(path: Path, data: bytes, *, mode: int = 0o644) -> None:
    """Atomically replace `path` with `data`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = tmp_name(path)
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
        fsync_dir(path.parent)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise disk_error(exc, f"writing {path.name}") from exc
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_text(path: Path, text: str) -> None:
    write_bytes(path, text.encode("utf-8"))


def link_or_copy(src: Path, dest: Path) -> None:
    """Atomically make `dest` a hard link to `src` (a copy only where a link is impossible)."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = tmp_name(dest)
    try:
        try:
            os.link(src, tmp)
        except OSError as exc:
            if exc.errno not in (errno.EXDEV, errno.EPERM, errno.EMLINK, errno.ENOTSUP):
                raise
            copy_file(src, tmp)
        os.replace(tmp, dest)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise disk_error(exc, f"linking {dest.name}") from exc
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def copy_file(src: Path, dest: Path, *, chunk: int = 8 << 20) -> None:
    with open(src, "rb") as fin, open(dest, "xb") as fout:
        while block := fin.read(chunk):
            fout.write(block)
        fout.flush()
        os.fsync(fout.fileno())

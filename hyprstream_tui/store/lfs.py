"""git-lfs: pointer files and the content-addressed object store under `.git/lfs/objects`.

Layout and pointer format follow the git-lfs spec (v1), so Debian's `git lfs ls-files` and
`git lfs fsck` read our repositories. Objects are written once (hash while copying, fsync,
`os.replace`) and made read-only, because working trees hard-link them.
"""

from __future__ import annotations

import fnmatch
import hashlib
import os
import re
import stat
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Callable

from hyprstream_tui.errors import StorageError
from hyprstream_tui.store.atomic import copy_file, disk_error, fsync_dir, link_or_copy, tmp_name

SPEC = "https://git-lfs.github.com/spec/v1"
LFS_PATTERNS = ("*.safetensors", "*.bin", "*.pt", "*.pth", "*.ckpt", "*.gguf", "*.onnx", "*.h5", "*.msgpack")
GITATTRIBUTES = "".join(f"{p} filter=lfs diff=lfs merge=lfs -text\n" for p in LFS_PATTERNS)
_POINTER_RE = re.compile(rb"version https://git-lfs\.github\.com/spec/v1\noid sha256:([0-9a-f]{64})\nsize ([0-9]+)\n")
CHUNK = 8 << 20
Progress = Callable[[int], None]


@dataclass(frozen=True)
class Pointer:
    oid: str  # sha256 hex
    size: int

    def encode(self) -> bytes:
        return f"version {SPEC}\noid sha256:{self.oid}\nsize {self.size}\n".encode()

    @classmethod
    def parse(cls, data: bytes) -> "Pointer | None":
        if len(data) > 200:
            return None
        match = _POINTER_RE.fullmatch(data)
        return cls(match.group(1).decode(), int(match.group(2))) if match else None


def is_large(relpath: str | PurePosixPath) -> bool:
    name = PurePosixPath(relpath).name
    return any(fnmatch.fnmatch(name, pattern) for pattern in LFS_PATTERNS)


def sha256_file(path: Path, progress: Progress | None = None) -> tuple[str, int]:
    digest = hashlib.sha256()
    size = 0
    with open(path, "rb") as fh:
        while block := fh.read(CHUNK):
            digest.update(block)
            size += len(block)
            if progress:
                progress(len(block))
    return digest.hexdigest(), size


class LfsObjects:
    """The object store of one repository (shared by its worktrees: it lives in the common dir)."""

    def __init__(self, common_dir: Path) -> None:
        self.root = common_dir / "lfs" / "objects"
        self.tmp = common_dir / "lfs" / "tmp"

    def path(self, oid: str) -> Path:
        return self.root / oid[0:2] / oid[2:4] / oid

    def has(self, pointer: Pointer) -> bool:
        try:
            return self.path(pointer.oid).stat().st_size == pointer.size
        except FileNotFoundError:
            return False

    def add(self, src: Path, *, link: bool = False, expected: str | None = None, progress: Progress | None = None) -> Pointer:
        """Store the file `src`; returns its pointer. With `link`, hard-link instead of copying.

        `expected` is a known sha256 (hub LFS oid): a mismatch raises and stores nothing.
        """
        self.tmp.mkdir(parents=True, exist_ok=True)
        tmp = tmp_name(self.tmp / "object")
        try:
            if link:
                link_or_copy(src, tmp)
                oid, size = sha256_file(tmp, progress)
            else:
                oid, size = _copy_hashing(src, tmp, progress)
            if expected is not None and oid != expected:
                raise StorageError(f"{src.name} does not match its sha256 (expected {expected[:12]}, got {oid[:12]}): the download is corrupt; try again.")
            pointer = Pointer(oid, size)
            dest = self.path(oid)
            if self.has(pointer):
                return pointer
            dest.parent.mkdir(parents=True, exist_ok=True)
            if not link:
                os.chmod(tmp, 0o444)
            os.replace(tmp, dest)
            fsync_dir(dest.parent)
            return pointer
        except OSError as exc:
            raise disk_error(exc, f"storing {src.name}") from exc
        finally:
            tmp.unlink(missing_ok=True)

    def materialize(self, pointer: Pointer, dest: Path) -> None:
        """Make `dest` the object's bytes: a hard link, or a copy where a link is impossible."""
        src = self.path(pointer.oid)
        if not self.has(pointer):
            raise StorageError(f"The large file for {dest.name} (sha256 {pointer.oid[:12]}) is missing from .git/lfs/objects: re-import or pull the model.")
        try:
            if os.path.samefile(src, dest):
                return
        except FileNotFoundError:
            pass
        link_or_copy(src, dest)

    def verify(self, pointer: Pointer) -> bool:
        if not self.has(pointer):
            return False
        return sha256_file(self.path(pointer.oid)) == (pointer.oid, pointer.size)


def _copy_hashing(src: Path, dest: Path, progress: Progress | None) -> tuple[str, int]:
    digest = hashlib.sha256()
    size = 0
    with open(src, "rb") as fin, open(dest, "xb") as fout:
        while block := fin.read(CHUNK):
            digest.update(block)
            fout.write(block)
            size += len(block)
            if progress:
                progress(len(block))
        fout.flush()
        os.fsync(fout.fileno())
    return digest.hexdigest(), size


def same_inode(a: Path, b: Path) -> bool:
    try:
        sa, sb = a.stat(), b.stat()
    except FileNotFoundError:
        return False
    return (sa.st_dev, sa.st_ino) == (sb.st_dev, sb.st_ino) and stat.S_ISREG(sa.st_mode)


__all__ = ["GITATTRIBUTES", "LFS_PATTERNS", "LfsObjects", "Pointer", "copy_file", "is_large", "same_inode", "sha256_file"]

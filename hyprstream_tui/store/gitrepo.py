"""The pygit2 layer: trees from path->content maps, commits with the ref written last, working
trees materialised with hard links to git-lfs objects, stale git lock files cleared.

libgit2 does not guard one Repository object across threads, so callers open a fresh one per
operation (`open_repo`); opening costs well under a millisecond.
"""

from __future__ import annotations

import os
import shutil
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Iterator, Mapping

import pygit2
from pygit2.enums import FileMode

from hyprstream_tui.errors import NotFound, StorageError, disk_full, is_disk_full
from hyprstream_tui.store.atomic import disk_error, write_bytes
from hyprstream_tui.store.lfs import LfsObjects, Pointer, is_large

pygit2.settings.enable_fsync_gitdir(True)  # crash safety: objects and refs reach the disk
FALLBACK_NAME, FALLBACK_EMAIL = "hyprstream", "hyprstream@localhost"


@dataclass(frozen=True)
class Entry:
    """One file of a tree: a git blob, or a git-lfs pointer blob (then `pointer` is set)."""

    oid: str
    mode: int
    pointer: Pointer | None


Change = bytes | Pointer | None  # None deletes the path


@contextmanager
def git_errors(what: str, repo_path: str | Path | None = None) -> Iterator[None]:
    try:
        yield
    except (pygit2.GitError, OSError) as exc:  # libgit2 reports a full disk as either
        if is_disk_full(exc) or (repo_path is not None and _disk_nearly_full(repo_path)):
            # (libgit2 sometimes loses the cause: "failed to create tag annotation", "target OID
            # for the reference doesn't exist" when the object could not be written)
            raise disk_full(what) from exc
        if isinstance(exc, OSError) and exc.errno is not None:
            raise disk_error(exc, what) from exc
        raise StorageError(f"git failed while {what}: {exc}") from exc


def _disk_nearly_full(path: str | Path) -> bool:
    try:
        return shutil.disk_usage(path).free < (1 << 20)
    except OSError:
        return False


def open_repo(path: Path) -> pygit2.Repository:
    try:
        return pygit2.Repository(str(path))
    except pygit2.GitError as exc:
        raise NotFound(f"{path} is not a hyprstream model repository ({exc}).") from exc


def init_repo(path: Path) -> pygit2.Repository:
    with git_errors("creating a git repository"):
        return pygit2.init_repository(str(path), bare=False, initial_head="main")


def signature(repo: pygit2.Repository) -> pygit2.Signature:
    try:
        return repo.default_signature
    except (KeyError, pygit2.GitError):
        return pygit2.Signature(FALLBACK_NAME, FALLBACK_EMAIL, int(time.time()), 0)


def commit_of(repo: pygit2.Repository, rev: str) -> pygit2.Commit:
    try:
        obj = repo.revparse_single(rev)
        return obj.peel(pygit2.Commit)
    except (KeyError, ValueError, pygit2.GitError, pygit2.InvalidSpecError):
        raise NotFound(f"No commit {rev!r} in {Path(repo.workdir or repo.path).name}: see `hyprstream lora log`.") from None


def tree_at(repo: pygit2.Repository, oid: pygit2.Oid | str) -> pygit2.Tree:
    """The tree object `oid` (pygit2's `repo[oid]` is typed as any object)."""
    return repo[oid].peel(pygit2.Tree)


def commit_at(repo: pygit2.Repository, oid: pygit2.Oid | str) -> pygit2.Commit:
    return repo[oid].peel(pygit2.Commit)


def blob_data(repo: pygit2.Repository, oid: pygit2.Oid | str) -> bytes:
    """The content of the blob `oid` (a blob's raw object is its content)."""
    return repo[oid].read_raw()


def write_tree(repo: pygit2.Repository, base: pygit2.Tree | None, changes: Mapping[str, Change]) -> pygit2.Oid:
    """A new tree: `base` with `changes` applied (bytes -> blob, Pointer -> pointer blob, None -> removed)."""
    index = pygit2.Index()
    if base is not None:
        index.read_tree(base)
    for path, content in sorted(changes.items()):
        if content is None:
            if path in index:
                index.remove(path)
            continue
        data = content.encode() if isinstance(content, Pointer) else content
        with git_errors(f"storing {PurePosixPath(path).name}"):
            index.add(pygit2.IndexEntry(path, repo.create_blob(data), FileMode.BLOB))
    with git_errors("writing the commit's tree"):
        return index.write_tree(repo)


def commit(repo: pygit2.Repository, ref: str, tree: pygit2.Oid, message: str, parents: list[pygit2.Oid]) -> str:
    """Write the commit object, then move `ref` to it: the ref is the last thing written."""
    with git_errors(f"committing to {ref}", repo.path):
        sig = signature(repo)
        oid = repo.create_commit(None, sig, sig, message, tree, parents)
        repo.references.create(ref, oid, force=True)
        return str(oid)


def entries(repo: pygit2.Repository, tree: pygit2.Tree, prefix: str = "") -> dict[str, Entry]:
    """Every file of `tree` (recursively) with its blob id and, for LFS pointers, the pointer."""
    out: dict[str, Entry] = {}
    for item in tree:
        path = f"{prefix}{item.name}"
        if item.type_str == "tree":
            out.update(entries(repo, tree_at(repo, item.id), path + "/"))
        elif item.type_str == "blob":
            pointer = Pointer.parse(blob_data(repo, item.id)) if is_large(path) else None
            out[path] = Entry(str(item.id), item.filemode, pointer)
    return out


def read_blob(repo: pygit2.Repository, tree: pygit2.Tree, path: str) -> bytes:
    try:
        item = tree[path]
    except KeyError:
        raise NotFound(f"No file {path!r} in that commit.") from None
    if item.type_str != "blob":
        raise NotFound(f"{path!r} is a folder, not a file.")
    return blob_data(repo, item.id)


def materialize(repo: pygit2.Repository, lfs: LfsObjects, tree: pygit2.Tree, dest: Path, *, prune: bool = True) -> None:
    """Make the folder `dest` hold exactly the files of `tree`: small files written atomically,
    large files hard-linked to their LFS object. Files already right are left alone."""
    wanted = entries(repo, tree)
    for path, entry in wanted.items():
        target = dest / PurePosixPath(path)
        if entry.pointer is not None:
            lfs.materialize(entry.pointer, target)
            continue
        data = blob_data(repo, entry.oid)
        if not (target.is_file() and not target.is_symlink() and target.stat().st_size == len(data) and target.read_bytes() == data):
            write_bytes(target, data)
    if prune:
        _prune(dest, set(wanted))


def _prune(dest: Path, keep: set[str]) -> None:
    for root, dirs, files in os.walk(dest, topdown=False):
        rel_root = Path(root).relative_to(dest)
        if rel_root.parts[:1] == (".git",):
            continue
        dirs[:] = [d for d in dirs if d != ".git"]
        for name in files:
            rel = (rel_root / name).as_posix()
            if rel not in keep and rel != ".git":
                os.unlink(Path(root) / name)
        if rel_root != Path(".") and not any(Path(root).iterdir()):
            os.rmdir(root)


def write_index(repo: pygit2.Repository, tree: pygit2.Tree) -> None:
    """Point the working tree's index at `tree`, so `git status` starts from the commit."""
    with git_errors("writing the index"):
        index = repo.index
        index.read_tree(tree)
        index.write()


STALE_LOCKS = ("index.lock", "HEAD.lock", "config.lock", "packed-refs.lock", "ORIG_HEAD.lock")


def clear_stale_locks(git_dir: Path) -> list[Path]:
    """Remove git lock files left by a killed process. Call only while holding the store's own
    lock for this repository: then no live hyprstream writer can own them."""
    removed: list[Path] = []
    candidates = [git_dir / name for name in STALE_LOCKS]
    candidates += list((git_dir / "refs").rglob("*.lock"))
    worktrees = git_dir / "worktrees"
    if worktrees.is_dir():
        candidates += [wt / name for wt in worktrees.iterdir() for name in STALE_LOCKS]
    for path in candidates:
        if path.is_file():
            path.unlink(missing_ok=True)
            removed.append(path)
    return removed

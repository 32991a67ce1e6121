"""Plain frozen dataclasses the store returns: what is on disk, never pygit2 objects."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True, kw_only=True)
class FileInfo:
    path: str
    size: int
    lfs: bool
    oid: str  # sha256 for LFS files, git blob id otherwise
    present: bool = True  # LFS object present in .git/lfs/objects


@dataclass(frozen=True, kw_only=True)
class CommitInfo:
    sha: str
    summary: str
    message: str
    time: int
    kind: str  # "import", "create", "checkpoint", "rollback", "samples", "merge", "other"
    step: int | None = None
    metrics: dict[str, Any] = field(default_factory=dict)
    tags: tuple[str, ...] = ()

    @property
    def short(self) -> str:
        return self.sha[:7]


@dataclass(frozen=True, kw_only=True)
class AdapterInfo:
    model: str
    uuid: str
    name: str
    branch: str
    tip: str  # the commit this reference resolved to (the branch tip unless a revision was given)
    base_commit: str | None = None
    worktree: str | None = None


@dataclass(frozen=True, kw_only=True)
class ModelSummary:
    name: str
    architecture: str
    model_type: str
    parameters: int
    dtype: str
    size_bytes: int
    adapters: int
    head: str
    source: str


@dataclass(frozen=True, kw_only=True)
class ModelInfo:
    summary: ModelSummary
    config: dict[str, Any]
    files: tuple[FileInfo, ...]
    branches: tuple[str, ...]
    adapters: tuple[AdapterInfo, ...]
    tags: tuple[str, ...]
    commits: tuple[CommitInfo, ...]


@dataclass(frozen=True)
class Progress:
    """Bytes done of the whole operation; `file` is what is being worked on."""

    file: str
    done: int
    total: int

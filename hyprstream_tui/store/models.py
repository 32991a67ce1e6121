"""Models: import a folder (or hub files) as a git repository, list, inspect, remove.

An import is built in a hidden folder `models/.import-<name>-<id>` and renamed into place when
complete, so a killed import leaves no half model: the leftover folder is swept on the next write.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

import pygit2

from hyprstream_tui import names
from hyprstream_tui.errors import Conflict, InvalidInput, NotFound, UnsafeContent
from hyprstream_tui.store import gitrepo
from hyprstream_tui.store.atomic import disk_error, fsync_dir
from hyprstream_tui.store.commits import format_message
from hyprstream_tui.store.inspect import architecture, is_pickle, parameter_count, read_config, read_safetensors_header
from hyprstream_tui.store.lfs import GITATTRIBUTES, LfsObjects, Pointer, is_large
from hyprstream_tui.store.types import Progress

SKIP_DIRS = {".git", ".cache", ".huggingface"}
SKIP_FILES = {".gitattributes"}
MAX_SMALL_FILE = 64 << 20  # a non-LFS file larger than this is a mistake, not a config


@dataclass(frozen=True)
class SourceFile:
    relpath: str
    path: Path
    sha256: str | None = None  # known digest (hub LFS oid), checked on the way in


def scan_folder(src: Path) -> list[SourceFile]:
    """Every regular file under `src` (links followed, as in a Hugging Face snapshot)."""
    if not src.exists():
        raise NotFound(f"No folder {src}: give the path of a model folder (config.json + *.safetensors).")
    if not src.is_dir():
        raise InvalidInput(f"{src} is a file: give the folder that holds config.json and the weights.")
    found: list[SourceFile] = []
    for root, dirs, files in os.walk(src, followlinks=False):
        dirs[:] = sorted(d for d in dirs if d not in SKIP_DIRS)
        for name in sorted(files):
            path = Path(root) / name
            rel = path.relative_to(src).as_posix()
            if name in SKIP_FILES or not path.is_file():
                continue
            names.repo_relpath(rel)
            found.append(SourceFile(rel, path))
    return found


def check_files(files: list[SourceFile], *, allow_pickle: bool) -> tuple[list[SourceFile], list[str]]:
    """Validate a model's files; returns (files to store, names skipped)."""
    by_name = {f.relpath: f for f in files}
    if "config.json" not in by_name:
        raise InvalidInput("The model has no config.json at its top level: point at a Hugging Face model folder.")
    read_config(by_name["config.json"].path)
    weights = [f for f in files if f.relpath.endswith(".safetensors")]
    pickles = [f for f in files if is_pickle(f.relpath)]
    skipped: list[str] = []
    if pickles and not allow_pickle:
        if not weights:
            raise UnsafeContent(
                f"{pickles[0].relpath} is a pickle file, which can run code when loaded: convert the model to "
                "safetensors, or set `allow_pickle` if you trust its source."
            )
        skipped = [f.relpath for f in pickles]
        files = [f for f in files if f not in pickles]
    if not weights and not (pickles and allow_pickle):
        raise InvalidInput("The model has no weights (*.safetensors): nothing to import.")
    for f in weights:
        read_safetensors_header(f.path)
    for f in files:
        if not is_large(f.relpath) and f.path.stat().st_size > MAX_SMALL_FILE:
            raise InvalidInput(f"{f.relpath} is {f.path.stat().st_size >> 20} MiB but not a known weights format: remove it from the folder.")
    return files, skipped


def build_repository(
    tmp: Path,
    files: list[SourceFile],
    *,
    message: str,
    link: bool,
    progress: Callable[[Progress], None] | None,
) -> str:
    """Create the repository in `tmp`: LFS objects, commit on main, working tree, index."""
    repo = gitrepo.init_repo(tmp)
    lfs = LfsObjects(Path(repo.path))
    total = sum(f.path.stat().st_size for f in files)
    done = 0
    changes: dict[str, bytes | Pointer | None] = {".gitattributes": GITATTRIBUTES.encode()}
    for f in files:
        def advance(n: int, _f: SourceFile = f) -> None:
            nonlocal done
            done += n
            if progress:
                progress(Progress(_f.relpath, done, total))

        if is_large(f.relpath):
            changes[f.relpath] = lfs.add(f.path, link=link, expected=f.sha256, progress=advance)
        else:
            data = f.path.read_bytes()
            changes[f.relpath] = data
            advance(len(data))
    tree_oid = gitrepo.write_tree(repo, None, changes)
    sha = gitrepo.commit(repo, "refs/heads/main", tree_oid, message, [])
    tree = gitrepo.tree_at(repo, tree_oid)
    gitrepo.materialize(repo, lfs, tree, tmp, prune=False)
    gitrepo.write_index(repo, tree)
    return sha


def import_files(
    models_dir: Path,
    name: str,
    files: list[SourceFile],
    *,
    summary: str,
    trailers: dict[str, str],
    link: bool,
    config: dict[str, str],
    progress: Callable[[Progress], None] | None = None,
) -> str:
    """Build the repository aside and rename it into `models/<name>`. Caller holds the model lock."""
    dest = models_dir / name
    if dest.exists():
        raise Conflict(f"A model named {name!r} exists already: choose another `name` or remove it with `hyprstream model rm {name}`.")
    models_dir.mkdir(parents=True, exist_ok=True)
    tmp = models_dir / f".import-{name}-{uuid.uuid4().hex[:8]}"
    try:
        sha = build_repository(tmp, files, message=format_message(summary, trailers), link=link, progress=progress)
        repo = pygit2.Repository(str(tmp))
        for key, value in config.items():
            repo.config[key] = value
        fsync_dir(tmp)
        os.rename(tmp, dest)
        fsync_dir(models_dir)
        return sha
    except OSError as exc:
        raise disk_error(exc, f"importing {name}") from exc
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def sweep_leftovers(models_dir: Path, is_busy: Callable[[str], bool]) -> list[Path]:
    """Remove `.import-*` / `.trash-*` folders of killed processes (not those being written now)."""
    removed: list[Path] = []
    if not models_dir.is_dir():
        return removed
    for entry in models_dir.iterdir():
        if not entry.name.startswith((".import-", ".trash-")):
            continue
        name = entry.name.split("-", 1)[1].rsplit("-", 1)[0]
        if not is_busy(name):
            shutil.rmtree(entry, ignore_errors=True)
            removed.append(entry)
    return removed


def weights_summary(repo: pygit2.Repository, lfs: LfsObjects, tree: pygit2.Tree) -> tuple[int, str]:
    """(parameter count, dtype) from the safetensors headers of the LFS objects, no torch."""
    params = 0
    dtypes: set[str] = set()
    for path, entry in gitrepo.entries(repo, tree).items():
        if entry.pointer and path.endswith(".safetensors") and lfs.has(entry.pointer):
            tensors = read_safetensors_header(lfs.path(entry.pointer.oid))
            params += parameter_count(tensors)
            dtypes.update(t.dtype for t in tensors)
    dtype = "/".join(sorted(dtypes)) if dtypes else "unknown"
    return params, dtype.lower().replace("f32", "float32").replace("bf16", "bfloat16").replace("f16", "float16")


def disk_usage(root: Path) -> int:
    """Bytes on disk under `root`, each hard-linked inode counted once."""
    seen: set[tuple[int, int]] = set()
    total = 0
    for base, _dirs, files in os.walk(root):
        for name in files:
            try:
                st = os.lstat(os.path.join(base, name))
            except FileNotFoundError:
                continue
            key = (st.st_dev, st.st_ino)
            if key not in seen:
                seen.add(key)
                total += st.st_blocks * 512
    return total


def config_summary(config: dict) -> dict:
    keys = ("model_type", "architectures", "hidden_size", "num_hidden_layers", "num_attention_heads",
            "num_key_value_heads", "intermediate_size", "vocab_size", "max_position_embeddings",
            "torch_dtype", "dtype", "rope_theta", "tie_word_embeddings")
    return {k: config[k] for k in keys if k in config}


def architecture_of(config: dict) -> str:
    return architecture(config)


def read_json_blob(data: bytes) -> dict:
    try:
        value = json.loads(data)
    except (ValueError, RecursionError):
        return {}
    return value if isinstance(value, dict) else {}


def iter_model_dirs(models_dir: Path) -> Iterable[Path]:
    if not models_dir.is_dir():
        return []
    return sorted(
        p for p in models_dir.iterdir()
        if p.is_dir() and not p.name.startswith(".") and p.name.lower() not in names.RESERVED_MODEL_NAMES
    )

"""`Store`: the one facade over `$HYPRSTREAM_HOME/models`. Methods take and return plain values
(names, paths, frozen dataclasses); every write holds the model's lock and writes git objects
first and the ref last."""

from __future__ import annotations

import os
import shutil
import threading
import uuid
from contextlib import contextmanager
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any, Callable, Iterator, Mapping, Sequence

import pygit2

from hyprstream_tui import names
from hyprstream_tui.errors import Conflict, NotFound, StorageError
from hyprstream_tui.settings import Paths
from hyprstream_tui.store import adapters as ad
from hyprstream_tui.store import gitrepo
from hyprstream_tui.store import models as md
from hyprstream_tui.store import remote
from hyprstream_tui.store.atomic import write_bytes
from hyprstream_tui.store.commits import format_message
from hyprstream_tui.store.inspect import read_safetensors_header
from hyprstream_tui.store.lfs import LfsObjects, Pointer
from hyprstream_tui.store.locks import FileLock, is_locked
from hyprstream_tui.store.types import AdapterInfo, CommitInfo, FileInfo, ModelInfo, ModelSummary, Progress

if TYPE_CHECKING:
    from hyprstream_tui.store.hub import DownloadProgress  # the hub module loads when a pull starts

CHECKPOINT_PATHS = ("adapter", "optimizer", "metrics", "data")


class Store:
    def __init__(self, paths: Paths | None = None) -> None:
        self.paths = paths or Paths.from_env()

    # ---- plumbing -------------------------------------------------------------------------
    def model_dir(self, name: str) -> Path:
        path = self.paths.models / names.model_name(name)
        if not (path / ".git").is_dir():
            known = ", ".join(p.name for p in md.iter_model_dirs(self.paths.models)) or "none yet"
            raise NotFound(f"No model named {name!r} (models: {known}): see `hyprstream model list`, or import one.")
        return path

    def _repo(self, name: str) -> pygit2.Repository:
        repo = gitrepo.open_repo(self.model_dir(name))
        if any(ref.startswith("refs/remotes/") for ref in repo.references):  # a plain `git clone`: its adapters
            remote.adopt_tracking_branches(repo)
        return repo

    def _lfs(self, repo: pygit2.Repository) -> LfsObjects:
        return LfsObjects(Path(repo.path))

    def _lock_path(self, name: str) -> Path:
        return self.paths.locks / f"model-{names.model_name(name)}.lock"

    def train_lock_path(self, model: str, adapter_uuid: str) -> Path:
        return self.paths.locks / f"train-{names.model_name(model)}-{adapter_uuid}.lock"

    @contextmanager
    def _writing(self, name: str) -> Iterator[FileLock]:
        """Hold the model's write lock; git lock files left by a killed writer are cleared."""
        lock = FileLock(self._lock_path(name), f"Model {name!r}").acquire()
        try:
            path = self.paths.models / name
            if (path / ".git").is_dir():
                gitrepo.clear_stale_locks(path / ".git")
            yield lock
        finally:
            lock.release()

    def head(self, name: str, ref: str = "main") -> str:
        return str(gitrepo.commit_of(self._repo(name), ref).id)

    # ---- models -----------------------------------------------------------------------------
    def import_model(self, src: Path | str, *, name: str | None = None, link: bool = False, allow_pickle: bool = False,
                     progress: Callable[[Progress], None] | None = None, summary: str | None = None,
                     trailers: Mapping[str, Any] | None = None) -> ModelSummary:
        """`summary` and `trailers` (which may replace `source`) describe where the files came
        from when they are not a user's folder, e.g. a merge records its base and adapter commits."""
        src = Path(src).expanduser()
        name = names.model_name(name if name is not None else src.resolve().name)
        files, skipped = md.check_files(md.scan_folder(src), allow_pickle=allow_pickle)
        all_trailers = {"source": f"local:{src.resolve()}", **{k: str(v) for k, v in (trailers or {}).items()}}
        if skipped:
            all_trailers["skipped"] = ",".join(skipped)
        self._import(name, files, summary=summary or f"Import {name}", trailers=all_trailers, link=link, progress=progress)
        return self.summary(name)

    def pull_model(self, repo_id: str, *, name: str | None = None, revision: str = "main", allow_pickle: bool = False,
                   token: str | None = None, progress: Callable[[DownloadProgress], None] | None = None,
                   cancel: threading.Event | None = None) -> ModelSummary:
        from hyprstream_tui.store import hub

        _org, repo_name = names.repo_id(repo_id)
        name = names.model_name(name if name is not None else repo_name)
        if (self.paths.models / name).exists():
            raise Conflict(f"A model named {name!r} exists already: choose another `name` or remove it first.")
        snap = hub.fetch(repo_id, revision=revision, token=token, allow_pickle=allow_pickle, progress=progress, cancel=cancel)
        files = [md.SourceFile(f.relpath, f.path, f.sha256) for f in snap.files]
        files, _skipped = md.check_files(files, allow_pickle=allow_pickle)
        trailers = {"source": f"hf://{snap.repo_id}", "revision": snap.commit, "requested": snap.revision}
        if snap.skipped:
            trailers["skipped"] = ",".join(snap.skipped)
        self._import(name, files, summary=f"Pull {snap.repo_id}@{snap.revision}", trailers=trailers, link=True)
        return self.summary(name)

    def _import(self, name: str, files: list[md.SourceFile], *, summary: str, trailers: dict[str, str], link: bool,
                progress: Callable[[Progress], None] | None = None) -> None:
        with self._writing(name):
            md.sweep_leftovers(self.paths.models, lambda n: n != name and is_locked(self._lock_path(n)))
            config = {"hyprstream.source": trailers["source"]}
            md.import_files(self.paths.models, name, files, summary=summary, trailers=trailers, link=link,
                            config=config, progress=progress)

    def list_models(self) -> list[ModelSummary]:
        return [self.summary(p.name) for p in md.iter_model_dirs(self.paths.models) if (p / ".git").is_dir()]

    def summary(self, name: str) -> ModelSummary:
        repo = self._repo(name)
        main = gitrepo.commit_of(repo, "refs/heads/main")
        config = md.read_json_blob(gitrepo.read_blob(repo, main.tree, "config.json"))
        params, dtype = md.weights_summary(repo, self._lfs(repo), main.tree)
        source = repo.config["hyprstream.source"] if "hyprstream.source" in repo.config else None
        return ModelSummary(
            name=name, architecture=md.architecture_of(config), model_type=str(config.get("model_type", "unknown")),
            parameters=params, dtype=dtype, size_bytes=md.disk_usage(self.model_dir(name)),
            adapters=len(ad.adapter_infos(repo, name, self.paths.working)), head=str(main.id), source=source if source is not None else "unknown",
        )

    def model_info(self, name: str, *, commits: int = 10) -> ModelInfo:
        repo = self._repo(name)
        lfs = self._lfs(repo)
        main = gitrepo.commit_of(repo, "refs/heads/main")
        config = md.read_json_blob(gitrepo.read_blob(repo, main.tree, "config.json"))
        files = tuple(
            FileInfo(path=p, size=e.pointer.size if e.pointer else len(gitrepo.blob_data(repo, e.oid)), lfs=e.pointer is not None,
                     oid=e.pointer.oid if e.pointer else e.oid, present=lfs.has(e.pointer) if e.pointer else True)
            for p, e in sorted(gitrepo.entries(repo, main.tree).items())
        )
        tags = ad.tags_by_commit(repo)
        history = [ad.commit_info(c, tags) for c in repo.walk(main.id, pygit2.enums.SortMode.TOPOLOGICAL)][:commits]
        return ModelInfo(summary=self.summary(name), config=md.config_summary(config), files=files,
                         branches=tuple(sorted(repo.branches.local)),
                         adapters=tuple(ad.adapter_infos(repo, name, self.paths.working)),
                         tags=tuple(sorted(t for ts in tags.values() for t in ts)), commits=tuple(history))

    def remove_model(self, name: str) -> None:
        path = self.model_dir(name)
        with self._writing(name):
            repo = gitrepo.open_repo(path)
            for a in ad.adapter_infos(repo, name, self.paths.working):
                if is_locked(self.train_lock_path(name, a.uuid)):
                    raise Conflict(f"Adapter {a.name!r} of {name!r} is training: stop it before removing the model.")
            trash = self.paths.models / f".trash-{name}-{uuid.uuid4().hex[:8]}"
            os.rename(path, trash)
            for a in ad.adapter_infos(gitrepo.open_repo(trash), name, self.paths.working):
                shutil.rmtree(self.paths.working / a.uuid, ignore_errors=True)
            shutil.rmtree(trash, ignore_errors=True)
            shutil.rmtree(self.paths.cache / "snapshots" / name, ignore_errors=True)

    # ---- reading any commit -------------------------------------------------------------------
    def read_file(self, model: str, commit: str, path: str) -> bytes:
        repo = self._repo(model)
        data = gitrepo.read_blob(repo, gitrepo.commit_of(repo, commit).tree, str(names.repo_relpath(path)))
        pointer = Pointer.parse(data)
        if pointer is not None:
            return self._lfs(repo).path(pointer.oid).read_bytes()
        return data

    def snapshot(self, model: str, commit: str, subdir: str | None = None) -> Path:
        """A folder holding the files of `commit` (only `subdir` if given), without checkout.
        Cached by commit id; LFS files are hard links."""
        repo = self._repo(model)
        c = gitrepo.commit_of(repo, commit)
        tree = c.tree
        if subdir:
            rel = str(names.repo_relpath(subdir))
            try:
                tree = gitrepo.tree_at(repo, tree[rel].id)
            except KeyError:
                raise NotFound(f"Commit {str(c.id)[:7]} of {model!r} has no {rel}/ folder.") from None
        dest = self.paths.cache / "snapshots" / model / str(c.id) / (subdir or "all")
        if dest.is_dir():
            return dest
        remote.fetch_missing(self.model_dir(model), repo, str(c.id))
        tmp = dest.with_name(f".{dest.name}-{uuid.uuid4().hex[:8]}")
        try:
            tmp.mkdir(parents=True)
            gitrepo.materialize(repo, self._lfs(repo), tree, tmp, prune=False)
            os.rename(tmp, dest)
        except OSError:
            if not dest.is_dir():
                raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return dest

    # ---- adapters -----------------------------------------------------------------------------
    def create_adapter(self, model: str, name: str, *, rank: int = 8, alpha: float = 16.0, dropout: float = 0.0,
                       target_modules: Sequence[str] = ad.DEFAULT_TARGETS) -> AdapterInfo:
        names.adapter_name(name)
        config = ad.peft_config(base_model=model, rank=rank, alpha=alpha, dropout=dropout, target_modules=target_modules)
        repo = self._repo(model)
        ad.check_targets(self._weight_names(repo), config["target_modules"])
        with self._writing(model):
            repo = self._repo(model)
            uid, _sha = ad.create(repo, model, name, config)
        return self.worktree_info(model, uid)

    def _weight_names(self, repo: pygit2.Repository) -> list[str]:
        lfs = self._lfs(repo)
        out = []
        for path, e in gitrepo.entries(repo, gitrepo.commit_of(repo, "refs/heads/main").tree).items():
            if e.pointer and path.endswith(".safetensors") and lfs.has(e.pointer):
                out += [t.name for t in read_safetensors_header(lfs.path(e.pointer.oid))]
        return out

    def list_adapters(self, model: str) -> list[AdapterInfo]:
        return ad.adapter_infos(self._repo(model), model, self.paths.working)

    def resolve_adapter(self, model: str, ref: str, rev: str | None = None) -> AdapterInfo:
        return ad.resolve(self._repo(model), model, self.paths.working, ref, rev)

    def worktree_info(self, model: str, ref: str) -> AdapterInfo:
        """Resolve `ref` and make sure its worktree exists (created or repaired)."""
        adapter = self.resolve_adapter(model, ref)
        path = self.paths.working / adapter.uuid
        if not (path / ".git").is_file():
            remote.fetch_missing(self.model_dir(model), self._repo(model), adapter.tip)
            with self._writing(model):
                repo = self._repo(model)
                ad.ensure_worktree(repo, self._lfs(repo), adapter, path)
        return adapter

    def worktree(self, model: str, ref: str) -> Path:
        return self.paths.working / self.worktree_info(model, ref).uuid

    def reset_worktree(self, model: str, ref: str) -> Path:
        """Make the worktree hold exactly the branch tip (after a crash or a rollback). Under the
        model's lock, which also clears the worktree's `index.lock` if a killed command left one."""
        adapter = self.worktree_info(model, ref)
        path = self.paths.working / adapter.uuid
        repo = self._repo(model)
        remote.fetch_missing(self.model_dir(model), repo, str(gitrepo.commit_of(repo, adapter.branch).id))
        with self._writing(model):
            repo = self._repo(model)
            tree = gitrepo.commit_of(repo, adapter.branch).tree
            gitrepo.materialize(repo, self._lfs(repo), tree, path)
            gitrepo.write_index(pygit2.Repository(str(path)), tree)
        return path

    def commit_worktree(self, model: str, ref: str, summary: str, trailers: Mapping[str, Any],
                        paths: Sequence[str] = CHECKPOINT_PATHS) -> CommitInfo:
        """Commit what is under `paths` in the adapter's worktree as the branch's next commit."""
        adapter = self.worktree_info(model, ref)
        with self._writing(model):
            repo = self._repo(model)
            tip = gitrepo.commit_of(repo, adapter.branch)
            worktree = self.paths.working / adapter.uuid
            changes = ad.worktree_changes(repo, self._lfs(repo), tip.tree, worktree, paths)
            tree_oid = gitrepo.write_tree(repo, tip.tree, changes)
            sha = gitrepo.commit(repo, f"refs/heads/{adapter.branch}", tree_oid, format_message(summary, trailers), [tip.id])
            try:
                gitrepo.write_index(pygit2.Repository(str(worktree)), gitrepo.tree_at(repo, tree_oid))
            except StorageError:
                # The commit is made (the ref moved): failing now (disk full) would have the user
                # repeat it. The index only serves plain `git status`; the next reset rewrites it.
                pass
            return ad.commit_info(gitrepo.commit_at(repo, sha), ad.tags_by_commit(repo))

    def commit_checkpoint(self, model: str, ref: str, *, step: int, metrics: Mapping[str, Any],
                          paths: Sequence[str] = CHECKPOINT_PATHS) -> CommitInfo:
        return self.commit_worktree(model, ref, f"Checkpoint at step {step}", {"step": step, **metrics}, paths)

    def write_files(self, model: str, ref: str, files: Mapping[str, bytes], summary: str,
                    trailers: Mapping[str, Any] | None = None) -> CommitInfo:
        """Write small files into the adapter's worktree (atomically) and commit them."""
        worktree = self.worktree(model, ref)
        rels = [str(names.repo_relpath(rel)) for rel in files]
        for rel, data in zip(rels, files.values()):
            write_bytes(worktree / PurePosixPath(rel), data)
        return self.commit_worktree(model, ref, summary, trailers or {}, rels)

    def log(self, model: str, ref: str, limit: int | None = None) -> list[CommitInfo]:
        repo = self._repo(model)
        return ad.log(repo, ad.resolve(repo, model, self.paths.working, ref), limit)

    def tag(self, model: str, ref: str, label: str, *, commit: str | None = None, force: bool = False) -> str:
        names.tag_label(label)  # a bad label or revision is refused before the lock is taken
        adapter = self.resolve_adapter(model, ref)
        if commit is not None:
            ad.resolve_rev(self._repo(model), adapter, commit)
        with self._writing(model):
            repo = self._repo(model)
            target = ad.resolve_rev(repo, adapter, commit) if commit is not None else adapter.tip
            return ad.tag(repo, adapter, label, target, force=force)

    def rollback(self, model: str, ref: str, target: str) -> CommitInfo:
        """A new commit whose tree is the chosen checkpoint's: history is never lost."""
        adapter = self.worktree_info(model, ref)
        if is_locked(self.train_lock_path(model, adapter.uuid)):
            raise Conflict(f"Adapter {adapter.name!r} is training: stop it (`hyprstream lora train stop`) before rolling back.")
        ad.resolve_rev(self._repo(model), adapter, target)  # a bad target is refused before the lock is taken
        with self._writing(model):
            repo = self._repo(model)
            sha = ad.resolve_rev(repo, adapter, target)
            chosen, tip = gitrepo.commit_at(repo, sha), gitrepo.commit_of(repo, adapter.branch)
            info = ad.commit_info(chosen, {})
            step = f"step {info.step}" if info.step is not None else "commit"
            trailers = {"rollback-of": sha, **({"step": info.step} if info.step is not None else {})}
            trailers.update({k: v for k, v in info.metrics.items() if k not in trailers and k != "rollback-of"})
            new = gitrepo.commit(repo, f"refs/heads/{adapter.branch}", chosen.tree.id,
                                 format_message(f"Roll back to {step} ({sha[:7]})", trailers), [tip.id])
            result = ad.commit_info(gitrepo.commit_at(repo, new), ad.tags_by_commit(repo))
        self.reset_worktree(model, adapter.uuid)
        return result

    # ---- git remotes (store/remote.py: refs through git, large files through git-lfs) ----------
    def push_model(self, name: str, to: str, *, force: bool = False,
                   progress: Callable[[Progress], None] | None = None) -> remote.Pushed:
        """Every branch and tag of the model, with the LFS objects their history needs."""
        repo = self._repo(name)
        refs = sorted(r for r in repo.references if r.startswith(("refs/heads/", "refs/tags/")))
        return remote.push(self.model_dir(name), remote.target(to, repo), refs, force=force, what=f"model {name!r}",
                           progress=progress)

    def push_adapter(self, model: str, ref: str, to: str, *, force: bool = False,
                     progress: Callable[[Progress], None] | None = None) -> remote.Pushed:
        """The adapter's branch and its `<adapter>/<label>` tags, with the LFS objects they need."""
        adapter = self.resolve_adapter(model, ref)
        repo = self._repo(model)
        tags = sorted(r for r in repo.references if r.startswith(f"refs/tags/{adapter.name}/"))
        return remote.push(self.model_dir(model), remote.target(to, repo), [f"refs/heads/{adapter.branch}", *tags],
                           force=force, what=f"adapter {adapter.name!r}", progress=progress)

    def clone_model(self, url: str, *, name: str | None = None,
                    progress: Callable[[Progress], None] | None = None) -> ModelSummary:
        """A model repository from a git remote: all branches' and tags' history, LFS objects included."""
        tgt = remote.target(url, for_push=False)
        default = tgt.arg.rstrip("/").replace(":", "/").rsplit("/", 1)[-1].removesuffix(".git")
        name = names.model_name(name if name is not None else default)
        if (self.paths.models / name).exists():
            raise Conflict(f"A model named {name!r} exists already: choose another `name` or remove it first.")
        remote.require_tools()
        with self._writing(name):
            md.sweep_leftovers(self.paths.models, lambda n: n != name and is_locked(self._lock_path(n)))
            tmp = self.paths.models / f".import-{name}-{uuid.uuid4().hex[:8]}"
            try:
                repo = remote.clone(tgt, tmp, progress=progress)
                main = gitrepo.commit_of(repo, "refs/heads/main")
                gitrepo.materialize(repo, self._lfs(repo), main.tree, tmp)
                gitrepo.write_index(repo, main.tree)
                repo.config["hyprstream.source"] = f"git:{remote.without_credentials(tgt.arg)}"
                os.rename(tmp, self.paths.models / name)
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
        return self.summary(name)

    def pull_adapter(self, model: str, ref: str, frm: str, *, force: bool = False,
                     progress: Callable[[Progress], None] | None = None) -> AdapterInfo:
        """One adapter (branch, tags, LFS objects) from a remote copy of this model: git objects
        and LFS objects first, into a private namespace; the branch and tags move last."""
        path = self.model_dir(model)
        tgt = remote.target(frm, self._repo(model), for_push=False)
        remote.require_tools()
        # one pull at a time per model (they share the incoming refs); writers are not held up by the transfer
        pulling = FileLock(self.paths.locks / f"pull-{names.model_name(model)}.lock", f"A pull into {model!r}").acquire()
        try:
            remote.drop_incoming(gitrepo.open_repo(path))  # what a killed pull left
            remote.fetch_incoming(path, tgt)
            incoming = remote.incoming_adapter(self._repo(model), ref, tgt.shown)
            if is_locked(self.train_lock_path(model, incoming.uuid)):
                raise Conflict(f"Adapter {incoming.name!r} is training here: stop it before pulling it.")
            remote.fetch_lfs(path, tgt, incoming.refs, progress=progress)
            with self._writing(model):
                remote.adopt_incoming(self._repo(model), model, incoming, force=force)
        finally:
            remote.drop_incoming(gitrepo.open_repo(path))
            pulling.release()
        if (self.paths.working / incoming.uuid / ".git").is_file():
            self.reset_worktree(model, incoming.uuid)
        return self.resolve_adapter(model, incoming.uuid)

"""Adapters on git: a branch `adapter/<uuid>` per LoRA adapter, its human name in git config and
`adapter/hyprstream.json`, a worktree per adapter, checkpoint commits, milestone tags, rollback.
"""

from __future__ import annotations

import json
import re
import shutil
import time
import uuid as uuidlib
from pathlib import Path
from typing import Any, Iterable, Sequence

import pygit2

from hyprstream_tui import names
from hyprstream_tui.errors import Conflict, InvalidInput, NotFound
from hyprstream_tui.store import gitrepo
from hyprstream_tui.store.commits import format_message, kind_of, parse_trailers, step_of
from hyprstream_tui.store.lfs import LfsObjects, Pointer, is_large
from hyprstream_tui.store.types import AdapterInfo, CommitInfo

BRANCH_PREFIX = "adapter/"
CONFIG_SECTION = "hyprstream-adapter"
META_PATH = "adapter/hyprstream.json"
ADAPTER_CONFIG_PATH = "adapter/adapter_config.json"
DEFAULT_TARGETS = ("q_proj", "v_proj")
_UUID_RE = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")
_HEX_RE = re.compile(r"[0-9a-f]{4,40}")
_STEP_REF_RE = re.compile(r"step:(\d+)")


def peft_config(*, base_model: str, rank: int, alpha: float, dropout: float, target_modules: Sequence[str]) -> dict[str, Any]:
    """PEFT's LoraConfig as JSON (what `LoraConfig.to_dict()` writes), validated here without peft."""
    if not isinstance(rank, int) or isinstance(rank, bool) or rank <= 0:
        raise InvalidInput(f"`rank` must be a positive whole number, got {rank!r}.")
    if not alpha > 0:
        raise InvalidInput(f"`alpha` must be positive, got {alpha!r}.")
    if not 0 <= dropout < 1:
        raise InvalidInput(f"`dropout` must be in [0, 1), got {dropout!r}.")
    targets = sorted({t.strip() for t in target_modules if t.strip()})
    if not targets or not all(re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", t) for t in targets):
        raise InvalidInput("`target_modules` must be module names such as q_proj,v_proj.")
    return {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model,
        "r": rank, "lora_alpha": alpha, "lora_dropout": dropout, "target_modules": targets,
        "bias": "none", "fan_in_fan_out": False, "inference_mode": True, "init_lora_weights": True,
        "modules_to_save": None, "use_rslora": False, "use_dora": False,
    }


def check_targets(weight_names: Iterable[str], targets: Sequence[str]) -> None:
    modules = {part for name in weight_names for part in name.split(".")}
    missing = [t for t in targets if t not in modules]
    if len(missing) == len(targets):
        raise InvalidInput(
            f"The base model has none of the target modules {', '.join(targets)}: pick `target_modules` from its "
            "layer names (e.g. q_proj,k_proj,v_proj,o_proj)."
        )


def adapter_infos(repo: pygit2.Repository, model: str, working: Path) -> list[AdapterInfo]:
    infos = []
    main_tip = str(repo.branches.local["main"].target) if "main" in repo.branches.local else None
    for branch in sorted(repo.branches.local):
        if not branch.startswith(BRANCH_PREFIX):
            continue
        uid = branch[len(BRANCH_PREFIX):]
        tip = str(repo.branches.local[branch].target)
        meta = _meta_at(repo, tip)
        name = _config_name(repo, uid) or meta.get("name") or uid
        infos.append(AdapterInfo(model=model, uuid=uid, name=name, branch=branch, tip=tip,
                                 base_commit=meta.get("base_commit", main_tip), worktree=str(working / uid)))
    return infos


def _config_name(repo: pygit2.Repository, uid: str) -> str | None:
    try:
        return repo.config[f"{CONFIG_SECTION}.{uid}.name"]
    except KeyError:
        return None


def _meta_at(repo: pygit2.Repository, sha: str) -> dict[str, Any]:
    try:
        data = gitrepo.read_blob(repo, repo[sha].peel(pygit2.Commit).tree, META_PATH)
        value = json.loads(data)
        return value if isinstance(value, dict) else {}
    except (NotFound, ValueError, KeyError, RecursionError):
        return {}


def create(repo: pygit2.Repository, model: str, name: str, adapter_config: dict[str, Any]) -> tuple[str, str]:
    """Commit the new adapter's files on a new branch forked from main; returns (uuid, commit)."""
    names.adapter_name(name)
    if any(a.name == name for a in adapter_infos(repo, model, Path("/"))):
        raise Conflict(f"Model {model!r} has an adapter named {name!r} already: choose another `name`.")
    main = gitrepo.commit_of(repo, "refs/heads/main")
    uid = str(uuidlib.uuid4())
    meta = {"name": name, "uuid": uid, "base_model": model, "base_commit": str(main.id), "created": int(time.time())}
    changes = {
        ADAPTER_CONFIG_PATH: (json.dumps(adapter_config, indent=2, sort_keys=True) + "\n").encode(),
        META_PATH: (json.dumps(meta, indent=2, sort_keys=True) + "\n").encode(),
    }
    tree = gitrepo.write_tree(repo, main.tree, changes)
    message = format_message(f"Create adapter {name}", {"rank": adapter_config.get("r"), "alpha": adapter_config.get("lora_alpha"),
                                                        "targets": ",".join(adapter_config.get("target_modules", []))})
    sha = gitrepo.commit(repo, f"refs/heads/{BRANCH_PREFIX}{uid}", tree, message, [main.id])
    repo.config[f"{CONFIG_SECTION}.{uid}.name"] = name
    return uid, sha


def resolve(repo: pygit2.Repository, model: str, working: Path, ref: str, rev: str | None = None) -> AdapterInfo:
    """An adapter by name, uuid (or unique prefix), tag `<name>/<label>`, or commit id."""
    if not isinstance(ref, str) or not ref or not ref.isprintable() or len(ref) > 200:
        raise InvalidInput("Give an adapter name, uuid, tag or commit.")
    adapters = adapter_infos(repo, model, working)
    found = _find_adapter(repo, adapters, ref)
    if found is None:
        known = ", ".join(a.name for a in adapters) or "none yet"
        raise NotFound(f"Model {model!r} has no adapter {ref!r} (adapters: {known}): see `hyprstream lora list {model}`.")
    adapter, commit = found
    if rev is not None:
        commit = resolve_rev(repo, adapter, rev)
    return AdapterInfo(model=adapter.model, uuid=adapter.uuid, name=adapter.name, branch=adapter.branch,
                       tip=commit, base_commit=adapter.base_commit, worktree=adapter.worktree)


def _find_adapter(repo: pygit2.Repository, adapters: list[AdapterInfo], ref: str) -> tuple[AdapterInfo, str] | None:
    for a in adapters:
        if ref in (a.name, a.uuid, a.branch):
            return a, a.tip
    if "/" in ref and f"refs/tags/{ref}" in repo.references:
        name = ref.split("/", 1)[0]
        for a in adapters:
            if a.name == name:
                return a, str(repo.references[f"refs/tags/{ref}"].peel(pygit2.Commit).id)
    if _HEX_RE.fullmatch(ref):
        by_uuid = [a for a in adapters if a.uuid.startswith(ref)]
        if len(by_uuid) == 1:
            return by_uuid[0], by_uuid[0].tip
        for a in adapters:
            sha = _in_history(repo, a, ref)
            if sha:
                return a, sha
    return None


def _in_history(repo: pygit2.Repository, adapter: AdapterInfo, prefix: str) -> str | None:
    for c in repo.walk(adapter.tip, pygit2.enums.SortMode.TOPOLOGICAL):
        if str(c.id).startswith(prefix):
            return str(c.id)
    return None


def resolve_rev(repo: pygit2.Repository, adapter: AdapterInfo, rev: str) -> str:
    """A revision of one adapter: commit id, tag label, full tag, or `step:N`."""
    if not isinstance(rev, str) or not rev or not rev.isprintable() or len(rev) > 200:  # libgit2 raises on these
        raise InvalidInput("Give a commit, tag or step:N.")
    match = _STEP_REF_RE.fullmatch(rev)
    if match:
        step = int(match.group(1))
        for info in log(repo, adapter):
            if info.kind == "checkpoint" and info.step == step:
                return info.sha
        raise NotFound(f"Adapter {adapter.name!r} has no checkpoint at step {step}: see `hyprstream lora log`.")
    for tag in (f"refs/tags/{adapter.name}/{rev}", f"refs/tags/{rev}"):
        if tag in repo.references:
            return str(repo.references[tag].peel(pygit2.Commit).id)
    if _HEX_RE.fullmatch(rev):
        sha = _in_history(repo, adapter, rev)
        if sha:
            return sha
    raise NotFound(f"Adapter {adapter.name!r} has no commit, tag or step {rev!r}: see `hyprstream lora log {adapter.model} {adapter.name}`.")


def log(repo: pygit2.Repository, adapter: AdapterInfo, limit: int | None = None) -> list[CommitInfo]:
    """Commits of the adapter branch, newest first, stopping at the fork from main."""
    tags = tags_by_commit(repo)
    walker = repo.walk(repo.branches.local[adapter.branch].target, pygit2.enums.SortMode.TOPOLOGICAL)
    walker.simplify_first_parent()
    if "main" in repo.branches.local:
        walker.hide(repo.branches.local["main"].target)
    if adapter.base_commit and adapter.base_commit in repo:  # pulled onto another import of the same model
        walker.hide(adapter.base_commit)
    out = []
    for c in walker:
        out.append(commit_info(c, tags))
        if limit and len(out) >= limit:
            break
    return out


def commit_info(c: pygit2.Commit, tags: dict[str, list[str]]) -> CommitInfo:
    summary = c.message.split("\n", 1)[0]
    trailers = parse_trailers(c.message)
    return CommitInfo(sha=str(c.id), summary=summary, message=c.message, time=c.commit_time,
                      kind=kind_of(summary), step=step_of(summary, trailers), metrics=trailers,
                      tags=tuple(tags.get(str(c.id), ())))


def tags_by_commit(repo: pygit2.Repository) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for ref in repo.references:
        if ref.startswith("refs/tags/"):
            target = str(repo.references[ref].peel(pygit2.Commit).id)
            out.setdefault(target, []).append(ref[len("refs/tags/"):])
    return out


def tag(repo: pygit2.Repository, adapter: AdapterInfo, label: str, commit: str, *, force: bool = False) -> str:
    names.tag_label(label)
    ref = f"refs/tags/{adapter.name}/{label}"
    if ref in repo.references and not force:
        raise Conflict(f"Tag {adapter.name}/{label} exists already: choose another label.")
    with gitrepo.git_errors("tagging", repo.path):
        if ref in repo.references:  # --force: the new tag object first, then the ref moves in one step
            oid = repo.odb.write(pygit2.enums.ObjectType.TAG, _tag_object(repo, f"{adapter.name}/{label}", commit, label, adapter.name))
            repo.references.create(ref, oid, force=True)  # a full disk cannot leave the label without its tag
        else:
            repo.create_tag(f"{adapter.name}/{label}", pygit2.Oid(hex=commit), pygit2.enums.ObjectType.COMMIT,
                            gitrepo.signature(repo), f"Milestone {label} of adapter {adapter.name}\n")
    return f"{adapter.name}/{label}"


def _tag_object(repo: pygit2.Repository, name: str, commit: str, label: str, adapter: str) -> bytes:
    """The raw annotated tag object that `create_tag` would write."""
    sig = gitrepo.signature(repo)
    sign = "-" if sig.offset < 0 else "+"
    offset = f"{sign}{abs(sig.offset) // 60:02d}{abs(sig.offset) % 60:02d}"
    return (f"object {commit}\ntype commit\ntag {name}\ntagger {sig.name} <{sig.email}> {sig.time} {offset}\n\n"
            f"Milestone {label} of adapter {adapter}\n").encode()


def worktree_changes(repo: pygit2.Repository, lfs: LfsObjects, base: pygit2.Tree, worktree: Path,
                     prefixes: Sequence[str]) -> dict[str, bytes | Pointer | None]:
    """What to commit: every file under `prefixes` in the worktree (large ones into LFS), and
    deletions of files under those prefixes that are gone."""
    changes: dict[str, bytes | Pointer | None] = {}
    current = gitrepo.entries(repo, base)
    for prefix in prefixes:
        names.repo_relpath(prefix)
        root = worktree / prefix
        files = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file()) if root.is_dir() else []
        for path in files:
            rel = path.relative_to(worktree).as_posix()
            if ".incomplete" in path.name:
                continue
            if is_large(rel):
                entry = current.get(rel)
                changes[rel] = entry.pointer if entry and entry.pointer and _same_object(lfs, entry.pointer, path) \
                    else lfs.add(path, link=True)
            else:
                changes[rel] = path.read_bytes()
        for rel in current:
            if (rel == prefix or rel.startswith(prefix.rstrip("/") + "/")) and rel not in changes:
                changes[rel] = None
    return changes


def _same_object(lfs: LfsObjects, pointer: Pointer, path: Path) -> bool:
    from hyprstream_tui.store.lfs import same_inode

    return same_inode(lfs.path(pointer.oid), path)


def ensure_worktree(repo: pygit2.Repository, lfs: LfsObjects, adapter: AdapterInfo, path: Path) -> Path:
    """The adapter's worktree, created or repaired (a killed creation leaves a broken one)."""
    wt_name = f"adapter-{adapter.uuid}"
    if (path / ".git").is_file():
        return path
    with gitrepo.git_errors("creating the adapter worktree"):
        if wt_name in repo.list_worktrees():
            repo.lookup_worktree(wt_name).prune(True)
        if path.exists():
            shutil.rmtree(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        repo.add_worktree(wt_name, str(path), repo.branches.local[adapter.branch])
    wt = pygit2.Repository(str(path))
    tree = wt.head.peel(pygit2.Commit).tree
    gitrepo.materialize(wt, lfs, tree, path, prune=False)
    return path

"""Git remotes: a whole model repository, or one adapter, to and from any git URL.

Refs travel through the `git` CLI and LFS objects through the `git-lfs` CLI. pygit2 (libgit2) has
no LFS transfer at all, and it pushes and fetches without the user's credential helpers, ssh
config or `insteadOf` rules, which the CLIs honour (git-lfs reads git's configuration). So only
talking to a remote shells out; every local write (refs, config, working trees) stays pygit2's.

A push sends the LFS objects first and the refs last, so the remote never holds a ref to a missing
object. git-lfs writes each object through a temporary file and a rename, so a push killed half
way leaves at most whole objects without refs, and the next push, which computes again from the
remote's refs what it lacks, sends the rest. A ref update that would rewrite the remote's history
(a branch that does not fast-forward, a tag that moves) is refused unless forced.

A URL with a password or token never reaches a log: messages show it redacted, a clone keeps it
without its credentials, and git-lfs's own error logs of such a command are removed.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Sequence

import pygit2

from hyprstream_tui.errors import Conflict, HubError, InvalidInput, NotFound, StorageError
from hyprstream_tui.store import gitrepo
from hyprstream_tui.store.lfs import LfsObjects, Pointer
from hyprstream_tui.store.types import Progress

GIT_LFS_MISSING = ("git-lfs is not installed, and the large files of a model (its weights) travel with git-lfs: "
                   "install it (`apt install git-lfs`, `brew install git-lfs`, or https://git-lfs.com) and try again.")
INCOMING = "refs/hyprstream/incoming/"  # where `lora pull` fetches before it moves any branch or tag
_UUID_BRANCH = re.compile(r"adapter/[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")
_SCP_LIKE = re.compile(r"^[A-Za-z0-9._-]+@[A-Za-z0-9._-]+:")  # git@host:org/repo.git
_HTTP_USERINFO = re.compile(r"(https?://)[^/@\s]+@", re.IGNORECASE)
_PASSWORD = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*://[^/@:\s]*):[^/@\s]+@")
_BATCH = 400  # object ids per `git lfs push --object-id` command line


class RemoteError(HubError):
    """A git remote could not be reached, or refused the push or fetch."""


@dataclass(frozen=True)
class Target:
    """A remote as git and git-lfs are given it (`arg`: a remote name or URL) and as shown."""

    arg: str
    shown: str


@dataclass(frozen=True, kw_only=True)
class Pushed:
    remote: str  # shown form: no credentials
    refs: tuple[str, ...]  # the branches and tags that changed on the remote (short names)
    objects: int  # LFS objects the remote was offered (it skips those it has)
    bytes: int


def redact(text: str) -> str:
    """`text` with the credentials of every URL in it replaced by `***`."""
    return _PASSWORD.sub(r"\1:***@", _HTTP_USERINFO.sub(r"\1***@", text))


def without_credentials(url: str) -> str:
    """The URL to keep in a clone's config: http(s) user info and any password dropped."""
    return _PASSWORD.sub(r"\1@", _HTTP_USERINFO.sub(r"\1", url))


def require_tools() -> None:
    if shutil.which("git") is None:
        raise RemoteError("git is not installed: install it (`apt install git`) and try again.")
    if shutil.which("git-lfs") is None:
        raise RemoteError(GIT_LFS_MISSING)


def target(remote: str, repo: pygit2.Repository | None = None, *, for_push: bool = True) -> Target:
    """A remote name of `repo`, a URL (`file://`, `https://`, `ssh://`, `git@host:path`), or a local
    path, which becomes a `file://` URL (git-lfs's standalone file transfer wants one)."""
    if not isinstance(remote, str) or not remote.strip() or not remote.isprintable() or remote.startswith("-"):
        raise InvalidInput("Give the remote as a git URL, a path, or the name of a configured remote.")
    if repo is not None and remote in repo.remotes.names():
        url = repo.remotes[remote].url or ""
        return Target(remote, f"{remote} ({redact(url)})")
    if "://" in remote or _SCP_LIKE.match(remote):
        return Target(remote, redact(remote))
    path = Path(remote).expanduser().absolute()
    if not path.exists():
        hint = f"create one with `git init --bare -b main {path}`" if for_push else "give the path or URL of one"
        raise NotFound(f"No git repository at {path}: {hint}.")
    return Target(path.as_uri(), str(path))


def run_git(cwd: Path, args: Sequence[str], what: str, *, secret: str = "", progress: Callable[[Progress], None] | None = None,
            env: dict[str, str] | None = None) -> str:
    """Run `git ARGS` (also `git lfs ...`) in `cwd` and return its stdout; a failure raises one line.

    With `progress`, git-lfs reports its transfer through GIT_LFS_PROGRESS, polled here."""
    require_tools()
    full_env = {**os.environ, "LC_ALL": "C", "GIT_LFS_SKIP_SMUDGE": "1", **(env or {})}
    if not sys.stdin.isatty():
        full_env["GIT_TERMINAL_PROMPT"] = "0"  # no credential prompt nobody can answer
    logs = cwd / ".git" / "lfs" / "logs"
    logs_before = set(logs.iterdir()) if logs.is_dir() else set()
    with tempfile.TemporaryDirectory(prefix="hyprstream-git-") as tmp:
        out_path, err_path, prog_path = Path(tmp) / "out", Path(tmp) / "err", Path(tmp) / "progress"
        if progress is not None:
            full_env["GIT_LFS_PROGRESS"] = str(prog_path)
        with open(out_path, "wb") as out, open(err_path, "wb") as err:
            proc = subprocess.Popen(["git", *args], cwd=cwd, stdout=out, stderr=err, stdin=subprocess.DEVNULL, env=full_env)
            try:
                while True:
                    try:
                        proc.wait(timeout=0.2)
                        break
                    except subprocess.TimeoutExpired:
                        if progress is not None:
                            _report(prog_path, progress)
            except BaseException:
                proc.kill()
                proc.wait()
                raise
        if progress is not None:
            _report(prog_path, progress)
        stdout = out_path.read_text(errors="replace")
        stderr = err_path.read_text(errors="replace")
    if secret and redact(secret) != secret and logs.is_dir():
        for path in set(logs.iterdir()) - logs_before:  # git-lfs logs its command line, URL included
            path.unlink(missing_ok=True)
    if proc.returncode != 0:
        raise RemoteError(f"git failed while {what}: {_last_line(stderr) or f'exit status {proc.returncode}'}")
    return stdout


def _last_line(stderr: str) -> str:
    lines = [ln.strip() for ln in redact(stderr).splitlines()
             if ln.strip() and not ln.lstrip().startswith(("hint:", "Errors logged to", "Use `git lfs logs last`"))]
    fatal = [ln for ln in lines if ln.startswith(("fatal:", "error:", "!", "ssh:"))]
    line = (fatal or lines or [""])[0]
    return line.removeprefix("fatal: ").removeprefix("error: ")


def _report(path: Path, progress: Callable[[Progress], None]) -> None:
    """git-lfs's progress lines: `<direction> <i>/<n> <done>/<total> <name>`, one per update."""
    try:
        lines = path.read_text(errors="replace").splitlines()
    except FileNotFoundError:
        return
    done: dict[str, tuple[int, int]] = {}
    for line in lines:
        parts = line.split(" ", 3)
        if len(parts) == 4 and "/" in parts[2]:
            a, _, b = parts[2].partition("/")
            if a.isdigit() and b.isdigit():
                done[parts[3]] = (int(a), int(b))
    if done:
        last = lines[-1].split(" ", 3)[-1]
        progress(Progress(file=last, done=sum(a for a, _ in done.values()), total=sum(b for _, b in done.values())))


def ls_remote(cwd: Path, tgt: Target) -> dict[str, str]:
    """The remote's refs: name -> object id (an annotated tag's own id, as a push compares)."""
    out = run_git(cwd, ["ls-remote", "--", tgt.arg], f"listing {tgt.shown}", secret=tgt.arg)
    refs = {}
    for line in out.splitlines():
        sha, _, ref = line.partition("\t")
        if ref and not ref.endswith("^{}"):
            refs[ref] = sha
    return refs


def peeled_commits(repo: pygit2.Repository, shas: Iterable[str]) -> list[str]:
    """The commits among `shas` (tags peeled) that this repository has."""
    out = []
    for sha in shas:
        try:
            out.append(str(repo[sha].peel(pygit2.Commit).id))
        except (KeyError, ValueError, pygit2.GitError, pygit2.InvalidSpecError):
            continue
    return out


def lfs_pointers(repo: pygit2.Repository, tips: Iterable[str], hide: Iterable[str] = ()) -> dict[str, tuple[str, Pointer]]:
    """Every LFS pointer in the commits reachable from `tips` and not from `hide`: oid -> (path, pointer)."""
    tips = list(tips)
    if not tips:
        return {}
    walker = repo.walk(tips[0], pygit2.enums.SortMode.NONE)
    for tip in tips[1:]:
        walker.push(tip)
    for sha in hide:
        walker.hide(sha)
    seen: set[str] = set()
    out: dict[str, tuple[str, Pointer]] = {}
    for c in walker:
        if str(c.tree_id) in seen:
            continue
        seen.add(str(c.tree_id))
        for path, entry in gitrepo.entries(repo, c.tree).items():
            if entry.pointer is not None:
                out.setdefault(entry.pointer.oid, (path, entry.pointer))
    return out


def rewrites(repo: pygit2.Repository, local: dict[str, str], remote: dict[str, str]) -> list[str]:
    """The refs whose update would rewrite the remote's history: a branch whose remote tip is not
    an ancestor of ours, a tag that points elsewhere."""
    out = []
    for ref, sha in local.items():
        theirs = remote.get(ref)
        if theirs is None or theirs == sha:
            continue
        if ref.startswith("refs/heads/") and theirs in repo and repo.descendant_of(sha, theirs):
            continue
        out.append(ref)
    return out


def short_ref(ref: str) -> str:
    return ref.removeprefix("refs/heads/").removeprefix("refs/tags/")


def push(repo_dir: Path, tgt: Target, refs: Sequence[str], *, force: bool = False, what: str,
         progress: Callable[[Progress], None] | None = None) -> Pushed:
    """Push `refs` (full names) of the repository at `repo_dir` to `tgt`: LFS objects, then refs."""
    require_tools()
    repo = gitrepo.open_repo(repo_dir)
    local = {ref: str(repo.references[ref].target) for ref in refs}  # fixed now: a commit made meanwhile waits for the next push
    theirs = ls_remote(repo_dir, tgt)
    rewritten = rewrites(repo, local, theirs)
    if rewritten and not force:
        listed = ", ".join(short_ref(r) for r in rewritten[:3]) + (" ..." if len(rewritten) > 3 else "")
        raise RemoteError(f"{tgt.shown} has history that pushing {what} would rewrite ({listed}): pull or clone it "
                          "to look first, or push again with --force to overwrite it.")
    changed = [ref for ref in refs if theirs.get(ref) != local[ref]]
    tips = peeled_commits(repo, local.values())
    pointers = lfs_pointers(repo, tips, peeled_commits(repo, theirs.values()))
    lfs = LfsObjects(Path(repo.path))
    missing = [path for path, p in pointers.values() if not lfs.has(p)]
    if missing:
        raise StorageError(f"The large file {missing[0]} is not in this repository's LFS objects, so it cannot be pushed: "
                           f"fetch it first (`git -C {repo_dir} lfs fetch --all`).")
    oids = sorted(pointers)
    for i in range(0, len(oids), _BATCH):
        run_git(repo_dir, ["lfs", "push", "--object-id", tgt.arg, *oids[i:i + _BATCH]],
                f"uploading large files to {tgt.shown}", secret=tgt.arg, progress=progress)
    if changed:
        refspecs = [f"{'+' if force else ''}{local[ref]}:{ref}" for ref in changed]
        # --no-verify: the LFS objects went first, so git-lfs's pre-push hook (if installed) would redo that
        run_git(repo_dir, ["push", "--no-verify", "--quiet", "--", tgt.arg, *refspecs], f"pushing to {tgt.shown}", secret=tgt.arg)
    return Pushed(remote=tgt.shown, refs=tuple(short_ref(r) for r in changed), objects=len(oids), bytes=sum(p.size for _, p in pointers.values()))


def adopt_tracking_branches(repo: pygit2.Repository) -> list[str]:
    """Local branches for a plain `git clone`'s remote-tracking `main` and `adapter/<uuid>`
    (what `git checkout adapter/<uuid>` would make), so the store lists its adapters. Creating
    a ref that does not exist cannot clobber anyone's; a race with another process is ignored."""
    made = []
    local = set(repo.branches.local)
    for ref in list(repo.references):
        if not ref.startswith("refs/remotes/"):
            continue
        branch = ref.split("/", 3)[3] if ref.count("/") >= 3 else ""
        if branch in local or not (branch == "main" or _UUID_BRANCH.fullmatch(branch)):
            continue
        try:
            target_id = repo.references[ref].resolve().target
            repo.references.create(f"refs/heads/{branch}", target_id, force=False)
            local.add(branch)
            made.append(branch)
        except (pygit2.GitError, pygit2.AlreadyExistsError, KeyError, ValueError):
            continue
    return made


def fetch_missing(repo_dir: Path, repo: pygit2.Repository, commit: str) -> None:
    """Fetch the LFS objects of `commit` that are not here, from the repository's remote (a plain
    `git clone` + `git lfs pull` fetches those of `main` only). No remote: nothing to do."""
    lfs = LfsObjects(Path(repo.path))
    tree = gitrepo.commit_at(repo, commit).tree
    if all(lfs.has(e.pointer) for e in gitrepo.entries(repo, tree).values() if e.pointer is not None):
        return
    names = [n for n in repo.remotes.names() if n]
    if not names:
        return
    remote = "origin" if "origin" in names else names[0]
    url = repo.remotes[remote].url or ""
    run_git(repo_dir, ["lfs", "fetch", remote, commit], f"fetching large files from {redact(url) or remote}", secret=url)


def clone(url: Target, dest: Path, *, progress: Callable[[Progress], None] | None = None) -> pygit2.Repository:
    """`git clone` of `url`'s main branch into `dest` (no checkout), its adapters as local
    branches, and every LFS object of every ref's history fetched."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    run_git(dest.parent, ["clone", "--quiet", "--no-checkout", "--branch", "main", "--", url.arg, str(dest)],
            f"cloning {url.shown}", secret=url.arg)
    repo = gitrepo.open_repo(dest)
    adopt_tracking_branches(repo)
    run_git(dest, ["lfs", "fetch", "--all", "origin"], f"fetching large files from {url.shown}", secret=url.arg,
            progress=progress)
    clean = without_credentials(url.arg)
    if clean != url.arg:  # the clone keeps the URL, never the password or token in it
        repo.remotes.set_url("origin", clean)
    return repo


def fetch_incoming(repo_dir: Path, tgt: Target) -> None:
    """The remote's adapter branches and tags, into refs/hyprstream/incoming/ (git objects only)."""
    run_git(repo_dir, ["fetch", "--quiet", "--no-tags", "--no-write-fetch-head", "--", tgt.arg,
                       f"+refs/heads/adapter/*:{INCOMING}adapter/*", f"+refs/tags/*:{INCOMING}tags/*"],
            f"fetching from {tgt.shown}", secret=tgt.arg)


def fetch_lfs(repo_dir: Path, tgt: Target, refs: Sequence[str], *, progress: Callable[[Progress], None] | None = None) -> None:
    """Every LFS object of the history of `refs`, from `tgt` (those already here are skipped)."""
    run_git(repo_dir, ["lfs", "fetch", "--all", tgt.arg, *refs], f"fetching large files from {tgt.shown}",
            secret=tgt.arg, progress=progress)


def drop_incoming(repo: pygit2.Repository) -> None:
    for ref in [r for r in repo.references if r.startswith(INCOMING)]:
        try:
            repo.references.delete(ref)
        except (KeyError, pygit2.GitError):
            continue



@dataclass(frozen=True, kw_only=True)
class Incoming:
    """An adapter as fetched into refs/hyprstream/incoming/, before any local ref moves."""

    uuid: str
    name: str
    tip: str
    base_commit: str | None
    tags: dict[str, str]  # local tag ref -> tag object id

    @property
    def refs(self) -> list[str]:
        return [f"{INCOMING}adapter/{self.uuid}", *(INCOMING + "tags/" + short_ref(t) for t in self.tags)]


def incoming_adapter(repo: pygit2.Repository, ref: str, shown: str) -> Incoming:
    """The fetched adapter named `ref` (its name, uuid, or a unique uuid prefix)."""
    from hyprstream_tui.store.adapters import META_PATH

    found: list[Incoming] = []
    prefix = INCOMING + "adapter/"
    for r in sorted(repo.references):
        if not r.startswith(prefix):
            continue
        uid, tip = r[len(prefix):], str(repo.references[r].target)
        try:
            meta = json.loads(gitrepo.read_blob(repo, gitrepo.commit_at(repo, tip).tree, META_PATH))
        except (NotFound, ValueError):
            meta = {}
        meta = meta if isinstance(meta, dict) else {}
        name = str(meta.get("name") or uid)
        tags = {f"refs/tags/{t[len(INCOMING + 'tags/'):]}": str(repo.references[t].target) for t in repo.references
                if t.startswith(f"{INCOMING}tags/{name}/")}
        found.append(Incoming(uuid=uid, name=name, tip=tip, base_commit=meta.get("base_commit"), tags=tags))
    exact = [a for a in found if ref in (a.name, a.uuid)]
    by_prefix = [a for a in found if len(ref) >= 4 and a.uuid.startswith(ref)]
    match = exact or (by_prefix if len(by_prefix) == 1 else [])
    if len(match) != 1:
        known = ", ".join(a.name for a in found) or "none"
        raise NotFound(f"{shown} has no adapter {ref!r} (adapters there: {known}).")
    return match[0]


def same_base(repo: pygit2.Repository, main: pygit2.Oid | str, base: str) -> bool:
    """Whether an adapter forked from commit `base` fits this `main`: `base` is in main's history,
    or holds the same config and weights (another home imported the same model)."""
    if base not in repo:
        return False
    if str(main) == base or repo.descendant_of(main, base):
        return True

    def fingerprint(commit: pygit2.Oid | str) -> dict[str, str]:
        return {path: e.pointer.oid if e.pointer else e.oid for path, e in gitrepo.entries(repo, gitrepo.commit_at(repo, commit).tree).items()
                if e.pointer is not None or path == "config.json"}

    return fingerprint(main) == fingerprint(base)


def adopt_incoming(repo: pygit2.Repository, model: str, adapter: Incoming, *, force: bool) -> list[str]:
    """Move the local branch and tags to the fetched ones (call under the model's lock, with the
    LFS objects fetched). Refuses what would rewrite local history unless `force`."""
    from hyprstream_tui.store.adapters import BRANCH_PREFIX, CONFIG_SECTION, adapter_infos

    base = adapter.base_commit
    if base and "main" in repo.branches.local and not same_base(repo, repo.branches.local["main"].target, base):
        raise Conflict(f"Adapter {adapter.name!r} was made on commit {base[:7]} of its base model, which {model!r} here "
                       "does not have: clone the whole model instead (`hyprstream model clone URL`).")
    for other in adapter_infos(repo, model, Path("/")):
        if other.name == adapter.name and other.uuid != adapter.uuid:
            raise Conflict(f"Model {model!r} has another adapter named {adapter.name!r} here: rename or remove it first.")
    branch = f"refs/heads/{BRANCH_PREFIX}{adapter.uuid}"
    current = {branch: str(repo.references[branch].target)} if branch in repo.references else {}
    current.update({t: str(repo.references[t].target) for t in adapter.tags if t in repo.references})
    # the fetched refs play "the remote" here: what would the local ones lose?
    wanted = {branch: adapter.tip, **adapter.tags}
    lost = [ref for ref, sha in current.items() if sha != wanted[ref]
            and not (ref == branch and sha in repo and repo.descendant_of(adapter.tip, sha))]
    if lost and not force:
        listed = ", ".join(short_ref(r) for r in lost[:3])
        raise Conflict(f"Pulling {adapter.name!r} would drop local history ({listed}): push yours first, or pull again "
                       "with --force to replace it.")
    moved = []
    with gitrepo.git_errors("updating the adapter's refs", repo.path):
        for ref, sha in wanted.items():  # the branch first: a tag is only read through its adapter
            if current.get(ref) != sha:
                repo.references.create(ref, pygit2.Oid(hex=sha), force=True)
                moved.append(short_ref(ref))
        repo.config[f"{CONFIG_SECTION}.{adapter.uuid}.name"] = adapter.name
    return moved

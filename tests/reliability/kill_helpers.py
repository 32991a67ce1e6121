"""Shared parts of the kill (test_kill_points.py) and Ctrl-C (test_sigint.py) tests: ways to start
a real `hyprstream` process, and the store checks run after each kill or interrupt.

Two ways to start a command, both real processes running `hyprstream_tui.cli.main(ARGS)`:
- `cold(...)`: `python -m hyprstream_tui ARGS`, exactly what the console script runs;
- `zygote().start(...)`: a fork of tests/reliability/kill_zygote.py, which has the heavy modules
  imported already, so the command's duration is its own work (and a kill lands in it).

`StoreState.capture(home)` records what is committed (every ref and every commit reachable from it);
`problems(home, before)` lists, in words, anything lost or corrupt since: `git fsck --full --strict`
on every model repository, every branch tip loads (LFS objects present with the right sha256, every
safetensors file and JSON config parses, a checkpoint's optimizer state is at its step), every commit
and ref that was there before still there.
"""

from __future__ import annotations

import atexit
import json
import os
import re
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from hyprstream_tui.store.lfs import LfsObjects, Pointer, is_large
from tests.helpers import REPO_ROOT

LONG = os.environ.get("HYPRSTREAM_LONG_TESTS") == "1"
ZYGOTE = Path(__file__).with_name("kill_zygote.py")
_CHECKPOINT_RE = re.compile(r"Checkpoint at step (\d+)")


def child_env(home: Path, **extra: str) -> dict[str, str]:
    """The environment of a command: this test's home, one torch thread, no real hub or token."""
    env = {k: v for k, v in os.environ.items() if k not in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN")}
    env.update({"HYPRSTREAM_HOME": str(home), "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
                "HF_HUB_DISABLE_IMPLICIT_TOKEN": "1", "HF_HUB_DISABLE_TELEMETRY": "1", "COLUMNS": "200",
                "PYTHONPATH": str(REPO_ROOT)})
    env.update(extra)
    return env


# ---- starting commands --------------------------------------------------------------------------
def cold(home: Path, log: Path, *args: str, env: dict[str, str] | None = None,
         new_session: bool = False) -> subprocess.Popen:
    """`python -m hyprstream_tui ARGS` (the console script's code path), output in `log`."""
    with open(log, "wb") as fh:
        return subprocess.Popen([sys.executable, "-m", "hyprstream_tui", *map(str, args)], stdin=subprocess.DEVNULL,
                                stdout=fh, stderr=fh, env={**child_env(home), **(env or {})}, cwd=REPO_ROOT,
                                start_new_session=new_session)


class Zygote:
    """tests/reliability/kill_zygote.py: forks a real `hyprstream ARGS` per request."""

    def __init__(self) -> None:
        env = child_env(Path("/nonexistent"))
        # huggingface_hub reads these once, at import: the zygote must be free to pull from the fake hub
        for name in ("HF_HUB_OFFLINE", "HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "HYPRSTREAM_HOME"):
            env.pop(name, None)
        self.proc = subprocess.Popen([sys.executable, str(ZYGOTE)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     text=True, env=env, cwd=REPO_ROOT)
        self._lock = threading.Lock()
        assert self._read() == {"ready": True}

    def _read(self) -> dict:
        line = self.proc.stdout.readline()
        assert line, "the kill zygote died"
        return json.loads(line)

    def _ask(self, request: dict) -> dict:
        with self._lock:
            self.proc.stdin.write(json.dumps(request) + "\n")
            self.proc.stdin.flush()
            return self._read()

    def start(self, home: Path, log: Path, *args: str, env: dict[str, str] | None = None) -> int:
        full = {**child_env(home), **(env or {})}
        full.pop("HF_HUB_OFFLINE", None)  # frozen in the zygote already; the env var alone would mislead
        return self._ask({"start": [str(log), full, "--home", str(home), *map(str, args)]})["pid"]

    def wait(self, pid: int) -> int:
        return self._ask({"wait": pid})["exit"]

    def run(self, home: Path, log: Path, *args: str, env: dict[str, str] | None = None) -> int:
        return self.wait(self.start(home, log, *args, env=env))

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.stdin.close()
            self.proc.wait(timeout=10)


_zygote: Zygote | None = None


def zygote() -> Zygote:
    """One zygote for the whole pytest process (its start-up imports torch: pay it once)."""
    global _zygote
    if _zygote is None or _zygote.proc.poll() is not None:
        _zygote = Zygote()
        atexit.register(_zygote.close)
    return _zygote


def wait_for(predicate, timeout: float, what: str, every: float = 0.01) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(every)


def log_text(log: Path) -> str:
    return log.read_text(errors="replace") if log.exists() else ""


# ---- what is committed, and is it intact ---------------------------------------------------------
def git(repo: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["git", "-C", str(repo), *args], capture_output=True, text=True)


def model_repos(home: Path) -> list[Path]:
    models = home / "models"
    if not models.is_dir():
        return []
    return sorted(p for p in models.iterdir() if not p.name.startswith(".") and (p / ".git").is_dir())


@dataclass
class StoreState:
    """model -> ref -> every commit reachable from it (its tip first)."""

    refs: dict[str, dict[str, list[str]]]

    @classmethod
    def capture(cls, home: Path) -> "StoreState":
        out: dict[str, dict[str, list[str]]] = {}
        for repo in model_repos(home):
            refs = git(repo, "for-each-ref", "--format=%(refname)", "refs/heads", "refs/tags").stdout.split()
            out[repo.name] = {ref: git(repo, "rev-list", ref).stdout.split() for ref in refs}
        return cls(out)

    def commits(self) -> int:
        return sum(len(set(c for commits in refs.values() for c in commits)) for refs in self.refs.values())


def lost_since(before: StoreState, after: StoreState) -> list[str]:
    """Committed things that are gone: a model, a ref, or a commit no longer reachable from its ref."""
    lost = []
    for model, refs in before.refs.items():
        now = after.refs.get(model)
        if now is None:
            lost.append(f"model {model} is gone")
            continue
        for ref, commits in refs.items():
            if ref not in now:
                lost.append(f"{model}: {ref} is gone")
                continue
            reachable = set(now[ref])
            missing = [c for c in commits if c not in reachable]
            if missing and not ref.startswith("refs/tags/"):
                lost.append(f"{model}: {len(missing)} commit(s) of {ref} lost, e.g. {missing[0][:12]}")
            elif ref.startswith("refs/tags/") and commits[:1] != now[ref][:1] and not ref.endswith("/best"):
                lost.append(f"{model}: tag {ref} moved")
    return lost


def tip_problems(repo: Path, ref: str) -> list[str]:
    """Does the tip of `ref` load: LFS objects present and intact, safetensors and JSON parse, a
    checkpoint's optimizer state says its step."""
    from safetensors import safe_open

    problems = []
    lfs = LfsObjects(repo / ".git")
    files = git(repo, "ls-tree", "-r", "--name-only", ref).stdout.splitlines()
    if ref == "refs/heads/main" and "config.json" not in files:
        problems.append(f"{repo.name}: main has no config.json")
    for path in files:
        blob = subprocess.run(["git", "-C", str(repo), "cat-file", "blob", f"{ref}:{path}"], capture_output=True).stdout
        if is_large(path):
            pointer = Pointer.parse(blob)
            if pointer is None:
                problems.append(f"{repo.name} {ref}:{path} is not an LFS pointer")
                continue
            if not lfs.verify(pointer):
                problems.append(f"{repo.name} {ref}:{path}: LFS object {pointer.oid[:12]} missing or corrupt")
                continue
            if path.endswith(".safetensors"):
                try:
                    with safe_open(str(lfs.path(pointer.oid)), framework="pt") as fh:
                        for key in fh.keys():
                            fh.get_tensor(key)
                except Exception as exc:  # noqa: BLE001 - any failure to load is the finding
                    problems.append(f"{repo.name} {ref}:{path} does not load: {exc}")
        elif path.endswith(".json"):
            try:
                json.loads(blob)
            except ValueError:
                problems.append(f"{repo.name} {ref}:{path} is not JSON")
    summary = git(repo, "log", "-1", "--format=%s", ref).stdout.strip()
    match = _CHECKPOINT_RE.fullmatch(summary)
    if match and ref.startswith("refs/heads/") and "optimizer/state.safetensors" in files:
        pointer = Pointer.parse(subprocess.run(["git", "-C", str(repo), "cat-file", "blob",
                                                f"{ref}:optimizer/state.safetensors"], capture_output=True).stdout)
        if pointer is not None and lfs.has(pointer):
            with safe_open(str(lfs.path(pointer.oid)), framework="pt") as fh:
                step = json.loads((fh.metadata() or {}).get("run_state", "{}")).get("step")
            if step != int(match.group(1)):
                problems.append(f"{repo.name} {ref}: '{summary}' holds the optimizer state of step {step}")
    return problems


def problems(home: Path, before: StoreState | None = None, *, lfs_fsck: bool = True) -> list[str]:
    """Everything wrong with the store at `home`, in words (empty: sound, nothing lost). Our own
    check of LFS objects covers every branch; `lfs_fsck` adds git-lfs's (of main), 0.2 s a repo."""
    found = []
    for repo in model_repos(home):
        fsck = git(repo, "fsck", "--full", "--strict", "--no-progress")
        if fsck.returncode != 0:
            found.append(f"{repo.name}: git fsck failed: {' '.join(fsck.stderr.split())[:300]}")
        if lfs_fsck:
            ref_lfs = git(repo, "lfs", "fsck")
            if ref_lfs.returncode != 0:
                found.append(f"{repo.name}: git lfs fsck failed: {' '.join((ref_lfs.stdout + ref_lfs.stderr).split())[:300]}")
        for ref in git(repo, "for-each-ref", "--format=%(refname)", "refs/heads").stdout.split():
            found += tip_problems(repo, ref)
    if before is not None:
        found += lost_since(before, StoreState.capture(home))
    return found


def leftovers(home: Path) -> list[str]:
    """Half-built models and git lock files: what a later command would trip over."""
    out = []
    models = home / "models"
    if models.is_dir():
        out += [p.name for p in models.iterdir() if p.name.startswith((".import-", ".trash-"))]
    for repo in model_repos(home):
        out += [str(p.relative_to(home)) for p in (repo / ".git").rglob("*.lock")]
    return out


def garbage(home: Path) -> dict[str, int]:
    """Temp files that kills left where nothing reads them (they block nothing; disk space only)."""
    out = {"lfs/tmp files": 0, "*.incomplete files": 0, "cache/merge-* folders": 0}
    for repo in model_repos(home):
        tmp = repo / ".git" / "lfs" / "tmp"
        out["lfs/tmp files"] += len(list(tmp.iterdir())) if tmp.is_dir() else 0
    out["*.incomplete files"] = sum(1 for p in home.rglob("*.incomplete") if "lfs" not in p.parts)
    cache = home / "cache"
    out["cache/merge-* folders"] = len(list(cache.glob("merge-*"))) if cache.is_dir() else 0
    return out


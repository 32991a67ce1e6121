"""Git remotes (store/remote.py, cli/share.py): `model push | clone`, `lora push | pull` against a
real bare repository behind a `file://` URL, through the real git and git-lfs CLIs (git-lfs's
standalone file transfer: no server), with the demo model, real stores and the real CLI."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

_ROOT = Path(__file__).resolve().parents[2]
if str(_ROOT) not in sys.path:
    sys.path.insert(0, str(_ROOT))

from hyprstream_tui.engine.tiny import DEMO_NAME  # noqa: E402
from hyprstream_tui.settings import Paths  # noqa: E402
from hyprstream_tui.store import Store  # noqa: E402
from hyprstream_tui.store.remote import redact, without_credentials  # noqa: E402
from tests.helpers import REPO_ROOT, Result, assert_one_line_error, git  # noqa: E402
from tests.tui.helpers import lora_weights  # noqa: E402

pytestmark = pytest.mark.skipif(shutil.which("git-lfs") is None, reason="git-lfs is not installed")
PROMPT = ["--prompt", "Hello there", "--temperature", "0", "--max-tokens", "8", "--json"]


def hs(home: Path, *args: str, env: dict | None = None, timeout: float = 180) -> Result:
    """The real `hyprstream` command against `home`."""
    full_env = {**os.environ, "HYPRSTREAM_HOME": str(home), "COLUMNS": "200", **(env or {})}
    proc = subprocess.run([sys.executable, "-m", "hyprstream_tui", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, env=full_env, cwd=REPO_ROOT)
    return Result(proc.returncode, proc.stdout, proc.stderr)


def ok(result: Result) -> str:
    assert result.returncode == 0, result
    return result.stdout


def checkpoint(store: Store, step: int, adapter: str = "quiz", seed: int | None = None) -> str:
    info = store.write_files(DEMO_NAME, adapter, {"adapter/adapter_model.safetensors": lora_weights(seed or step, scale=0.5)},
                             f"Checkpoint at step {step}", {"step": step, "loss": 1.0 / step})
    return info.sha


@pytest.fixture
def origin(demo_home) -> Store:
    """The demo model with adapter `quiz`: two checkpoints (steps 10, 20) and the tag quiz/v1 on step 10."""
    store = Store(Paths.from_env(demo_home))
    store.create_adapter(DEMO_NAME, "quiz", rank=8, alpha=16)
    checkpoint(store, 10)
    store.tag(DEMO_NAME, "quiz", "v1")
    checkpoint(store, 20)
    return store


@pytest.fixture
def bare(tmp_path) -> tuple[Path, str]:
    path = tmp_path / "remote.git"
    subprocess.run(["git", "init", "--quiet", "--bare", "-b", "main", str(path)], check=True)
    return path, path.as_uri()


def new_home(tmp_path: Path, name: str) -> Path:
    path = tmp_path / name
    path.mkdir()
    return path


def assert_remote_clean(path: Path) -> None:
    """`git fsck`, and `git lfs fsck` of every commit any ref reaches (it checks one commit at a
    time: every LFS object of that commit present, with the right sha256)."""
    assert git(path, "fsck", "--strict").returncode == 0
    commits = git(path, "rev-list", "--all").stdout.split()
    assert commits
    for sha in commits:
        lfs = git(path, "lfs", "fsck", sha, check=False)
        assert lfs.returncode == 0 and "fsck OK" in lfs.stdout, lfs


def remote_log(path: Path, ref: str) -> list[str]:
    return git(path, "rev-list", ref).stdout.split()


def infer_text(home: Path, spec: str) -> str:
    return json.loads(ok(hs(home, "infer", spec, *PROMPT)))["text"]


# -- a whole model ----------------------------------------------------------------------------------
def test_plain_git_clone_of_a_pushed_model_lists_infers_logs_and_rolls_back(origin, bare, tmp_path):
    path, url = bare
    out = ok(hs(origin.paths.home, "model", "push", DEMO_NAME, url))
    assert "Pushed model" in out and "adapter/" in out
    assert_remote_clean(path)
    quiz = origin.resolve_adapter(DEMO_NAME, "quiz")
    assert git(path, "rev-parse", quiz.branch).stdout.strip() == quiz.tip
    # a second home: plain git, nothing of ours
    home2 = new_home(tmp_path, "home2")
    (home2 / "models").mkdir()
    subprocess.run(["git", "clone", "--quiet", url, str(home2 / "models" / DEMO_NAME)], check=True, capture_output=True)
    git(home2 / "models" / DEMO_NAME, "lfs", "pull")
    assert "quiz" in ok(hs(home2, "lora", "list", DEMO_NAME))
    assert infer_text(home2, f"{DEMO_NAME}:quiz") == infer_text(origin.paths.home, f"{DEMO_NAME}:quiz")
    log = ok(hs(home2, "lora", "log", f"{DEMO_NAME}:quiz"))
    assert "Checkpoint at step 20" in log and "Checkpoint at step 10" in log and "quiz/v1" in log
    # step 10's weights were not fetched by `git lfs pull` (main only): the rollback fetches them
    out = ok(hs(home2, "lora", "rollback", f"{DEMO_NAME}:quiz", "step:10"))
    assert "Roll back to step 10" in out
    store2 = Store(Paths.from_env(home2))
    tip = store2.resolve_adapter(DEMO_NAME, "quiz").tip
    assert store2.read_file(DEMO_NAME, tip, "adapter/adapter_model.safetensors") == lora_weights(10, scale=0.5)


def test_model_clone_brings_adapters_tags_history_and_every_large_file(origin, bare, tmp_path):
    path, url = bare
    origin.push_model(DEMO_NAME, url)
    home3 = new_home(tmp_path, "home3")
    out = ok(hs(home3, "model", "clone", url, "--name", "copy"))
    assert "Cloned copy" in out and "1 adapters" in out
    store3 = Store(Paths.from_env(home3))
    repo = home3 / "models" / "copy"
    assert git(repo, "lfs", "fsck").returncode == 0
    assert [c.sha for c in store3.log("copy", "quiz")] == [c.sha for c in origin.log(DEMO_NAME, "quiz")]
    assert store3.resolve_adapter("copy", "quiz/v1").tip == origin.resolve_adapter(DEMO_NAME, "quiz/v1").tip
    # the working tree is the store's: weights hard-linked to their LFS objects, no second copy
    weights = next(repo.glob("*.safetensors"))
    assert weights.stat().st_nlink >= 2
    assert git(repo, "status", "--porcelain").stdout == ""
    # every checkpoint's weights came along: a rollback needs no remote
    shutil.rmtree(path)
    store3.rollback("copy", "quiz", "step:10")
    assert store3.read_file("copy", store3.resolve_adapter("copy", "quiz").tip,
                            "adapter/adapter_model.safetensors") == lora_weights(10, scale=0.5)
    assert "remote.git" in git(repo, "config", "hyprstream.source").stdout
    assert infer_text(home3, "copy:quiz@v1") == infer_text(origin.paths.home, f"{DEMO_NAME}:quiz@v1")
    # a name taken is one line
    assert_one_line_error(hs(home3, "model", "clone", url, "--name", "copy"), "exists already")


# -- one adapter ------------------------------------------------------------------------------------
def test_lora_push_then_pull_into_a_home_that_has_the_base_model(origin, bare, tmp_path, demo_src):
    path, url = bare
    out = ok(hs(origin.paths.home, "lora", "push", f"{DEMO_NAME}:quiz", url))
    assert "Pushed adapter quiz" in out
    assert_remote_clean(path)
    assert git(path, "tag", "-l").stdout.split() == ["quiz/v1"]
    # another home imported the same model itself (another import commit, the same weights)
    store2 = Store(Paths.from_env(new_home(tmp_path, "home2")))
    store2.import_model(demo_src, name=DEMO_NAME)
    assert "Pulled adapter quiz" in ok(hs(store2.paths.home, "lora", "pull", f"{DEMO_NAME}:quiz", url))
    mine, theirs = store2.resolve_adapter(DEMO_NAME, "quiz"), origin.resolve_adapter(DEMO_NAME, "quiz")
    assert (mine.uuid, mine.tip) == (theirs.uuid, theirs.tip)
    assert [c.summary for c in store2.log(DEMO_NAME, "quiz")] == [c.summary for c in origin.log(DEMO_NAME, "quiz")]
    assert store2.resolve_adapter(DEMO_NAME, "quiz/v1").tip == origin.resolve_adapter(DEMO_NAME, "quiz/v1").tip
    snap = store2.snapshot(DEMO_NAME, mine.tip, "adapter")
    assert (snap / "adapter_model.safetensors").read_bytes() == lora_weights(20, scale=0.5)
    assert not [r for r in git(store2.model_dir(DEMO_NAME), "for-each-ref").stdout.splitlines() if "incoming" in r]
    # a newer checkpoint there: the next pull fast-forwards the branch (and its worktree)
    checkpoint(origin, 30)
    origin.push_adapter(DEMO_NAME, "quiz", url)
    store2.worktree(DEMO_NAME, "quiz")
    ok(hs(store2.paths.home, "lora", "pull", "quiz", url, "--model", DEMO_NAME))
    assert store2.resolve_adapter(DEMO_NAME, "quiz").tip == origin.resolve_adapter(DEMO_NAME, "quiz").tip
    assert (store2.worktree(DEMO_NAME, "quiz") / "adapter" / "adapter_model.safetensors").read_bytes() == lora_weights(30, scale=0.5)
    assert_one_line_error(hs(store2.paths.home, "lora", "pull", f"{DEMO_NAME}:nope", url), "no adapter 'nope'", "quiz")


def test_pushing_a_rolled_back_adapter_keeps_its_history(origin, bare):
    path, url = bare
    origin.push_adapter(DEMO_NAME, "quiz", url)
    before = remote_log(path, "refs/heads/" + origin.resolve_adapter(DEMO_NAME, "quiz").branch)
    origin.rollback(DEMO_NAME, "quiz", "step:10")
    pushed = origin.push_adapter(DEMO_NAME, "quiz", url)  # a fast-forward: no --force needed
    after = remote_log(path, "refs/heads/" + origin.resolve_adapter(DEMO_NAME, "quiz").branch)
    assert len(after) == len(before) + 1 and set(before) <= set(after)
    assert pushed.refs == (origin.resolve_adapter(DEMO_NAME, "quiz").branch,)
    assert_remote_clean(path)


def test_a_push_that_would_rewrite_the_remote_is_refused_without_force(origin, bare, tmp_path):
    path, url = bare
    origin.push_model(DEMO_NAME, url)
    # someone else pushes a checkpoint the origin does not have
    other = Store(Paths.from_env(new_home(tmp_path, "other")))
    other.clone_model(url, name=DEMO_NAME)
    checkpoint(other, 30, seed=300)
    other.push_adapter(DEMO_NAME, "quiz", url)
    theirs = other.resolve_adapter(DEMO_NAME, "quiz").tip
    checkpoint(origin, 30, seed=301)  # diverged
    refused = hs(origin.paths.home, "lora", "push", f"{DEMO_NAME}:quiz", url)
    assert_one_line_error(refused, "rewrite", "--force")
    branch = "refs/heads/" + origin.resolve_adapter(DEMO_NAME, "quiz").branch
    assert git(path, "rev-parse", branch).stdout.strip() == theirs
    assert "Pushed adapter quiz" in ok(hs(origin.paths.home, "lora", "push", f"{DEMO_NAME}:quiz", url, "--force"))
    assert git(path, "rev-parse", branch).stdout.strip() == origin.resolve_adapter(DEMO_NAME, "quiz").tip
    # a moved tag is a rewrite too
    origin.tag(DEMO_NAME, "quiz", "v1", commit="step:20", force=True)
    assert_one_line_error(hs(origin.paths.home, "model", "push", DEMO_NAME, url), "quiz/v1", "--force")
    assert_remote_clean(path)


# -- killed pushes ----------------------------------------------------------------------------------
def _wrapped_git(tmp_path: Path) -> Path:
    """A `git` first on PATH that runs the real one, except that `git push` (the refs, after the
    LFS objects) announces itself and hangs: the moment to kill the push between the two."""
    real = shutil.which("git")
    folder = tmp_path / "wrapped"
    folder.mkdir()
    script = folder / "git"
    script.write_text(f"""#!/bin/sh
for arg in "$@"; do
  if [ "$arg" = "push" ] && [ "$1" != "lfs" ]; then touch "{folder}/pushing"; sleep 600; fi
done
exec {real} "$@"
""")
    script.chmod(0o755)
    return folder


def test_a_push_killed_after_the_large_files_is_finished_by_the_next_push(origin, bare, tmp_path):
    path, url = bare
    wrapped = _wrapped_git(tmp_path)
    env = {**os.environ, "HYPRSTREAM_HOME": str(origin.paths.home), "PATH": f"{wrapped}:{os.environ['PATH']}"}
    proc = subprocess.Popen([sys.executable, "-m", "hyprstream_tui", "model", "push", DEMO_NAME, url], env=env,
                            cwd=REPO_ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + 120
    while not (wrapped / "pushing").exists():
        assert proc.poll() is None and time.monotonic() < deadline, "the push never reached its refs"
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    # the LFS objects went first; no ref yet, so nothing on the remote points at a missing object
    assert list((path / "lfs" / "objects").rglob("*")) and git(path, "for-each-ref").stdout == ""
    out = ok(hs(origin.paths.home, "model", "push", DEMO_NAME, url))
    assert "Pushed model" in out
    assert git(path, "rev-parse", "main").stdout.strip() == origin.head(DEMO_NAME)
    assert_remote_clean(path)


@pytest.mark.skipif(not Path("/dev/shm").is_dir(), reason="needs a second file system (tmpfs /dev/shm)")
def test_a_push_killed_during_the_large_file_transfer_is_finished_by_the_next_push(origin, tmp_path):
    """On the same file system git-lfs hard-links objects (instant); a tmpfs remote makes it copy,
    through `lfs/tmp` and a rename, long enough to be killed half way."""
    import tempfile

    with tempfile.TemporaryDirectory(dir="/dev/shm") as shm:
        path = Path(shm) / "remote.git"
        subprocess.run(["git", "init", "--quiet", "--bare", "-b", "main", str(path)], check=True)
        wt = origin.worktree(DEMO_NAME, "quiz")
        (wt / "data").mkdir(exist_ok=True)
        with open(wt / "data" / "big.bin", "wb") as fh:
            fh.write(os.urandom(1 << 20) * 128)  # 128 MiB: ~0.1 s to copy
        origin.commit_worktree(DEMO_NAME, "quiz", "Add big", {}, ["data"])
        env = {**os.environ, "HYPRSTREAM_HOME": str(origin.paths.home)}
        proc = subprocess.Popen([sys.executable, "-m", "hyprstream_tui", "lora", "push", f"{DEMO_NAME}:quiz", path.as_uri()],
                                env=env, cwd=REPO_ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                start_new_session=True)
        partial = []
        while proc.poll() is None and not partial:
            time.sleep(0.002)
            partial = [p for p in (path / "lfs" / "tmp").glob("*") if p.stat().st_size > 0] if (path / "lfs" / "tmp").is_dir() else []
        if not partial:
            pytest.skip("the transfer finished before it could be killed (a fast disk)")
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        assert git(path, "for-each-ref").stdout == ""  # no ref: the objects were not all there
        ok(hs(origin.paths.home, "lora", "push", f"{DEMO_NAME}:quiz", path.as_uri()))
        quiz = origin.resolve_adapter(DEMO_NAME, "quiz")
        assert git(path, "rev-parse", quiz.branch).stdout.strip() == quiz.tip
        assert_remote_clean(path)


# -- mistakes ----------------------------------------------------------------------------------------
def test_without_git_lfs_on_path_one_line_names_it(origin, bare, tmp_path):
    _path, url = bare
    only_git = tmp_path / "only-git"
    only_git.mkdir()
    os.symlink(shutil.which("git"), only_git / "git")
    env = {"PATH": str(only_git)}
    for args in (("model", "push", DEMO_NAME, url), ("lora", "push", f"{DEMO_NAME}:quiz", url),
                 ("model", "clone", url, "--name", "x")):
        assert_one_line_error(hs(origin.paths.home, *args, env=env), "git-lfs is not installed", "install")
    assert not (origin.paths.models / "x").exists()


def test_remote_mistakes_are_one_line(origin, bare, tmp_path):
    _path, url = bare
    home = origin.paths.home
    assert_one_line_error(hs(home, "model", "push", DEMO_NAME), "exactly one")
    assert_one_line_error(hs(home, "model", "push", DEMO_NAME, url, "--hub", "org/x"), "exactly one")
    assert_one_line_error(hs(home, "lora", "pull", "quiz", url), "--model")
    assert_one_line_error(hs(home, "model", "push", DEMO_NAME, str(tmp_path / "nowhere.git")), "git init --bare")
    assert_one_line_error(hs(home, "model", "clone", (tmp_path / "empty").as_uri()), "git failed while cloning")
    # options that belong to the other kind of remote
    assert_one_line_error(hs(home, "model", "push", DEMO_NAME, url, "--token", "t"), "--token is for --hub")
    assert_one_line_error(hs(home, "model", "push", DEMO_NAME, url, "--revision", "dev"), "--revision is for --hub")
    assert_one_line_error(hs(home, "lora", "push", f"{DEMO_NAME}:quiz", url, "--commit", "step:1"), "--commit is for --hub")
    assert_one_line_error(hs(home, "model", "push", DEMO_NAME, "--hub", "org/x", "--force"), "--force is for git remotes")


def test_credentials_in_a_url_never_reach_a_message_or_a_log(origin):
    assert redact("https://user:s3cret@host/x.git") == "https://***@host/x.git"
    assert redact("fatal: unable to access 'https://tok@host/x/': refused") == "fatal: unable to access 'https://***@host/x/': refused"
    assert redact("ssh://git:pw@host/x") == "ssh://git:***@host/x"
    assert without_credentials("https://user:s3cret@host/x.git") == "https://host/x.git"
    assert without_credentials("git@host:org/x.git") == "git@host:org/x.git"
    result = hs(origin.paths.home, "model", "push", DEMO_NAME, "https://user:s3cret@127.0.0.1:9/x.git",
                env={"GIT_TERMINAL_PROMPT": "0"})
    assert_one_line_error(result, "git failed")
    assert "s3cret" not in result.stderr + result.stdout
    logs = origin.model_dir(DEMO_NAME) / ".git" / "lfs" / "logs"
    assert not logs.is_dir() or not any("s3cret" in p.read_text(errors="replace") for p in logs.iterdir())

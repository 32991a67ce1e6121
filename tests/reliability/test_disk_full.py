"""Promise 2 of the reliability suite: a full disk corrupts nothing.

Real `hyprstream` processes write under a file-size limit (RLIMIT_FSIZE, with SIGXFSZ ignored so
that a write fails with EFBIG instead of killing the process) during an import, a training
checkpoint, adding samples, an export, a merge and a pull. Where this process may mount a tmpfs
(root), the same is done on a real 4 MiB filesystem filled up to its last bytes (ENOSPC).

After each failed command:
- stderr is one line, `error: ... disk space ... free some space ...`, with no traceback;
- every repository is sound (`git fsck --full --strict`, every LFS object of every branch verifies)
  and every ref is where it was (or, where the command did complete, it says so and exit 0);
- no temp file is left under the home (`*.incomplete`, `.import-*`, `merge-*`, snapshot temps,
  `.git/lfs/tmp/*`, libgit2's `tmp_object*` and `*.lock` files in a git dir);
- the same command with the limit lifted works.

The limits are chosen from the sizes of the files each command writes, so each one fails at a known
stage (git init, a blob, an LFS object, the adapter file, the optimizer state file, ...);
HYPRSTREAM_LONG_TESTS=1 adds more stages and random limits (HYPRSTREAM_DISK_SEED).
"""

from __future__ import annotations

import json
import os
import random
import resource
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import REPO_ROOT, Result, assert_one_line_error, git

LONG = os.environ.get("HYPRSTREAM_LONG_TESTS") == "1"
SEED = int(os.environ.get("HYPRSTREAM_DISK_SEED", "7"))
DISK_WORDS = ("disk space", "free some space")
SCENARIOS: list[str] = []  # "what: limit -> outcome", printed at the end of the module


@pytest.fixture(scope="module", autouse=True)
def _report():
    yield
    print(f"\ndisk-full scenarios run: {len(SCENARIOS)}")
    for line in SCENARIOS:
        print("  " + line)


# ---- running the real command under a limit -----------------------------------------------------
def _limit(nbytes: int):
    def preexec() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # EFBIG, not death by signal
        resource.setrlimit(resource.RLIMIT_FSIZE, (nbytes, nbytes))

    return preexec


def hyprstream(home: Path, *args: str, limit: int | None = None, env: dict | None = None,
               timeout: float = 180) -> Result:
    full_env = {**os.environ, "HYPRSTREAM_HOME": str(home), "COLUMNS": "200", "OMP_NUM_THREADS": "1",
                "HF_HUB_OFFLINE": "1", **(env or {})}
    proc = subprocess.run([sys.executable, "-m", "hyprstream_tui", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, env=full_env, cwd=REPO_ROOT,
                          preexec_fn=_limit(limit) if limit is not None else None)
    return Result(proc.returncode, proc.stdout, proc.stderr)


class Zygote:
    """disk_zygote.py: forks `hyprstream` commands with torch, transformers and peft imported."""

    def __init__(self) -> None:
        env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
               "COLUMNS": "200"}
        self.proc = subprocess.Popen([sys.executable, str(Path(__file__).with_name("disk_zygote.py"))],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env, cwd=REPO_ROOT)
        assert self.proc.stdout.readline().strip() == "ready"

    def __call__(self, home: Path, *args: str, limit: int | None = None) -> Result:
        request = {"home": str(home), "args": [str(a) for a in args], "limit": limit}
        self.proc.stdin.write(json.dumps(request) + "\n")
        self.proc.stdin.flush()
        answer = json.loads(self.proc.stdout.readline())
        return Result(answer["code"], answer["stdout"], answer["stderr"])

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=30)


@pytest.fixture(scope="module")
def zygote():
    z = Zygote()
    yield z
    z.close()


def record(what: str, limit: int | str, result: Result) -> None:
    outcome = "ok" if result.returncode == 0 else result.stderr.strip()[:110]
    SCENARIOS.append(f"{what} @ {limit}: {outcome}")


# ---- what must hold after each one ---------------------------------------------------------------
def refs(home: Path) -> dict[str, str]:
    """Every ref of every model repository: {"model refs/...": sha}."""
    out = {}
    models = home / "models"
    for repo in sorted(models.iterdir()) if models.is_dir() else []:
        if (repo / ".git").is_dir():
            listing = git(repo, "for-each-ref", "--format=%(refname) %(objectname)").stdout.split("\n")
            out.update({f"{repo.name} {ln.split()[0]}": ln.split()[1] for ln in listing if ln.strip()})
    return out


def junk(root: Path) -> list[str]:
    """Temp files a failed write must not leave behind (lock files in locks/ stay by design: a
    flock, not the file, is the lock)."""
    found = []
    for path in root.rglob("*"):
        name, parts = path.name, path.relative_to(root).parts
        if parts[:1] == ("locks",):
            continue
        if (".incomplete" in name or name.startswith((".import-", ".trash-", "tmp_object", "merge-"))
                or name.endswith((".tmp", ".partial"))
                or (".git" in parts and name.endswith(".lock"))
                or (path.parent.name == "tmp" and path.parent.parent.name == "lfs")
                or ("snapshots" in parts and name.startswith("."))):
            found.append(str(path.relative_to(root)))
    return sorted(found)


def assert_sound(home: Path) -> None:
    from tests.store.test_crash import assert_repository_sound

    for repo in sorted((home / "models").iterdir()):
        if (repo / ".git").is_dir():
            assert_repository_sound(repo)
    assert junk(home) == [], junk(home)


def assert_disk_error(result: Result) -> None:
    assert_one_line_error(result, *DISK_WORDS)
    assert result.returncode == 6, result  # StorageError


# ---- a trained adapter, built once and copied per test -------------------------------------------
@pytest.fixture(scope="module")
def template(tmp_path_factory, tiny_model_src, zygote) -> Path:
    """A home with the tiny model, adapter `qa` (4 samples) trained 2 steps: one checkpoint."""
    from tests.train.helpers import make_store

    home = tmp_path_factory.mktemp("template") / "home"
    make_store(home, tiny_model_src)
    result = zygote(home, "lora", "train", "start", "qa", "--steps", "2", "--checkpoint-every", "2",
                    "--learning-rate", "3e-2")
    assert result.returncode == 0, result.stderr
    return home


@pytest.fixture
def trained_home(template, tmp_path, monkeypatch) -> Path:
    """A private copy of the template (the worktree, which names its path, is recreated)."""
    from hyprstream_tui.settings import Paths
    from hyprstream_tui.store import Store

    home = tmp_path / "home"
    shutil.copytree(template, home, symlinks=True, ignore=shutil.ignore_patterns("working", "worktrees"))
    monkeypatch.setenv("HYPRSTREAM_HOME", str(home))
    Store(Paths.from_env(home)).worktree("tiny", "qa")
    return home


def adapter_tip(home: Path) -> str:
    return [sha for ref, sha in refs(home).items() if ref.startswith("tiny refs/heads/adapter/")][0]


def tip_file(home: Path, path: str) -> bytes:
    from hyprstream_tui.settings import Paths
    from hyprstream_tui.store import Store

    return Store(Paths.from_env(home)).read_file("tiny", adapter_tip(home), path)


def sample_count(home: Path) -> int:
    return len([ln for ln in tip_file(home, "data/samples.jsonl").splitlines() if ln.strip()])


# ---- the scenarios -----------------------------------------------------------------------------------
def test_import_under_a_full_disk_leaves_no_half_model(home, tiny_model_src):
    weights = (tiny_model_src / "model.safetensors").stat().st_size
    # git init's own files / the tokenizer's blob (weights hard-linked) / the weights' LFS object
    cases = [(100, ()), (4_000, ("--link",)), (weights // 2, ())]
    if LONG:
        rng = random.Random(SEED)
        cases += [(1, ()), (20_000, ("--link",))] + [(rng.randrange(1, weights), ()) for _ in range(6)]
    for i, (limit, extra) in enumerate(cases):
        result = hyprstream(home, "model", "import", tiny_model_src, "--name", f"m{i}", *extra, limit=limit)
        record(f"model import {' '.join(extra)}".strip(), limit, result)
        assert_disk_error(result)
        assert not (home / "models" / f"m{i}").exists()
        assert junk(home) == [], junk(home)
    result = hyprstream(home, "model", "import", tiny_model_src, "--name", "m0")
    assert result.returncode == 0, result.stderr
    assert_sound(home)


def test_checkpoint_under_a_full_disk_keeps_the_previous_one(trained_home, zygote):
    home = trained_home
    before = refs(home)
    adapter = len(tip_file(home, "adapter/adapter_model.safetensors"))
    state = len(tip_file(home, "optimizer/state.safetensors"))
    assert adapter < state
    # The adapter file written, the optimizer state not: a half checkpoint in the worktree.
    limits = [adapter + 1]
    if LONG:  # the adapter file itself; the heartbeat / index; random
        rng = random.Random(SEED)
        limits += [adapter - 1, 300] + [rng.randrange(300, state) for _ in range(4)]
    for limit in limits:
        result = zygote(home, "lora", "train", "start", "qa", "--steps", "2", "--checkpoint-every", "1",
                        limit=limit)
        record("lora train start (checkpoint)", limit, result)
        assert_disk_error(result)
        assert refs(home) == before
        assert_sound(home)
    # The limit lifted: training resumes from the kept checkpoint (step 2) and commits steps 3, 4.
    result = zygote(home, "lora", "train", "start", "qa", "--steps", "2", "--checkpoint-every", "2")
    assert result.returncode == 0, result.stderr
    assert "from step 2 to 4" in result.stdout, result.stdout
    assert git(home / "models" / "tiny", "rev-parse", f"{adapter_tip(home)}^").stdout.strip() == \
        before[next(r for r in before if "/adapter/" in r)]
    assert_sound(home)


def test_adding_samples_under_a_full_disk_adds_all_or_nothing(trained_home):
    home = trained_home
    # the samples file / a git blob or tree / the worktree's index (after the commit)
    limits = [10, 100, 1_000]
    if LONG:
        rng = random.Random(SEED)
        limits += [1, 300, 600] + [rng.randrange(1, 2_000) for _ in range(6)]
    for i, limit in enumerate(limits):
        count, tip = sample_count(home), adapter_tip(home)
        result = hyprstream(home, "lora", "train", "sample", "qa", "--input", f"q{i}", "--output", f"a{i}",
                            limit=limit)
        record("lora train sample", limit, result)
        if result.returncode == 0:  # it did fit: then it is committed exactly once
            assert sample_count(home) == count + 1
        else:
            assert_disk_error(result)
            assert (adapter_tip(home), sample_count(home)) == (tip, count)
        assert_sound(home)
    assert any(not s.endswith(": ok") for s in SCENARIOS if s.startswith("lora train sample"))
    count = sample_count(home)
    result = hyprstream(home, "lora", "train", "sample", "qa", "--input", "last", "--output", "one")
    assert result.returncode == 0, result.stderr
    assert sample_count(home) == count + 1


@pytest.mark.parametrize("fmt", ["safetensors", "peft"])
def test_export_under_a_full_disk_writes_no_partial_output(trained_home, tmp_path, fmt):
    home, out = trained_home, tmp_path / "out"
    out.mkdir()
    target = out / ("qa.safetensors" if fmt == "safetensors" else "qa")
    adapter = len(tip_file(home, "adapter/adapter_model.safetensors"))
    limits = [100, adapter // 2]  # the snapshot's config file / the weights
    for limit in limits:
        result = hyprstream(home, "lora", "export", "qa", "-o", target, "--format", fmt, limit=limit)
        record(f"lora export --format {fmt}", limit, result)
        assert_disk_error(result)
        assert list(out.iterdir()) == []
        assert_sound(home)
    result = hyprstream(home, "lora", "export", "qa", "-o", target, "--format", fmt)
    assert result.returncode == 0, result.stderr
    assert [p.name for p in out.iterdir()] == [target.name]


def test_merge_under_a_full_disk_creates_no_model(trained_home, tiny_model_src, zygote):
    home = trained_home
    before = refs(home)
    weights = (tiny_model_src / "model.safetensors").stat().st_size
    limits = [weights // 3] + ([weights // 50, weights - 1] if LONG else [])
    for limit in limits:
        result = zygote(home, "lora", "merge", "qa", "--name", "merged", limit=limit)
        record("lora merge", limit, result)
        assert_disk_error(result)
        assert refs(home) == before and not (home / "models" / "merged").exists()
        assert_sound(home)
    result = zygote(home, "lora", "merge", "qa", "--name", "merged")
    assert result.returncode == 0, result.stderr
    assert_sound(home)


def test_pull_under_a_full_disk_then_resumes(home, tiny_model_src, tmp_path, monkeypatch):
    import huggingface_hub.constants as hf_constants

    from tests.hubserver import FakeHub

    monkeypatch.setattr(hf_constants, "HF_HUB_DISABLE_IMPLICIT_TOKEN", True)
    weights = (tiny_model_src / "model.safetensors").stat().st_size
    hf_home = tmp_path / "hf-home"
    with FakeHub() as hub:
        hub.add_repo("org/tiny", tiny_model_src)
        env = {"HF_HUB_OFFLINE": "0", "HF_ENDPOINT": hub.url, "HF_HOME": str(hf_home), "HF_TOKEN": "",
               "HF_HUB_DISABLE_IMPLICIT_TOKEN": "1"}
        for limit in [weights // 2] + ([100, 2_000] if LONG else []):
            result = hyprstream(home, "model", "pull", "org/tiny", limit=limit, env=env)
            record("model pull", limit, result)
            assert_disk_error(result)
            assert not (home / "models" / "tiny").exists()
            assert junk(home) == [], junk(home)
        result = hyprstream(home, "model", "pull", "org/tiny", env=env)
        assert result.returncode == 0, result.stderr
    assert_sound(home)
    assert junk(hf_home) == [], junk(hf_home)  # the partial download was resumed, then cleared


# ---- a real small filesystem: ENOSPC ------------------------------------------------------------------
@pytest.fixture
def small_fs(tmp_path):
    """A 4 MiB tmpfs (root only; skipped elsewhere)."""
    mnt = tmp_path / "small"
    mnt.mkdir()
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a small filesystem needs root")
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mnt)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode(errors='replace').strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


def fill(fs: Path, leave: int) -> Path:
    """Fill the filesystem up to `leave` free bytes."""
    filler = fs / "filler"
    free = shutil.disk_usage(fs).free
    with open(filler, "ab") as fh:
        try:
            fh.write(b"\0" * max(0, free - leave))
            fh.flush()
            os.fsync(fh.fileno())
        except OSError:
            pass
    return filler


def test_a_really_full_filesystem(small_fs, tiny_model_src, tmp_path):
    home = small_fs / "home"
    assert hyprstream(home, "model", "import", tiny_model_src, "--name", "tiny").returncode == 0
    assert hyprstream(home, "lora", "create", "--name", "qa", "--base-model", "tiny").returncode == 0
    first = adapter_tip(home)
    assert hyprstream(home, "lora", "train", "sample", "qa", "--input", "q0", "--output", "a0").returncode == 0
    tip = adapter_tip(home)
    assert tip != first
    # v1 on the first commit, so `v1 --force` below moves it: a new tag object that must be written
    # (a tag moved onto its own commit could reuse its object and need no space at all).
    assert hyprstream(home, "lora", "tag", "qa", "v1", "--commit", first).returncode == 0
    before = refs(home)
    for args in (("model", "import", tiny_model_src, "--name", "second"),
                 ("lora", "train", "sample", "qa", "--input", "q", "--output", "a"),
                 ("lora", "create", "--name", "qb", "--base-model", "tiny"),
                 ("lora", "tag", "qa", "v2"),
                 ("lora", "tag", "qa", "v1", "--force"),  # moving a tag never loses it
                 ("lora", "rollback", "qa", first)):
        # Full before each command: a refused command's clean-up (or the next one's sweep of
        # leftovers) can give back a page, and a tag needs no more (a full run once saw it pass).
        filler = fill(small_fs, 0)
        result = hyprstream(home, *args)
        record(f"ENOSPC {' '.join(map(str, args[:3 if args[0] == 'lora' else 2]))}", "full tmpfs", result)
        assert_disk_error(result)
        assert refs(home) == before
        assert not (home / "models" / "second").exists()
        assert_sound(home)
    filler.unlink()
    result = hyprstream(home, "lora", "train", "sample", "qa", "--input", "q", "--output", "a")
    assert result.returncode == 0, result.stderr
    assert json.loads(hyprstream(home, "lora", "list", "--json").stdout)[0]["name"] == "qa"
    assert_sound(home)


# ---- the CLI's last resort ------------------------------------------------------------------------------
@pytest.mark.parametrize("exc", [OSError(28, "No space left on device"), OSError(122, "Disk quota exceeded"),
                                 RuntimeError("Error while serializing: I/O error: File too large (os error 27)")])
def test_cli_turns_a_full_disk_from_anywhere_into_one_line(exc, home, monkeypatch, capsys):
    """Wherever a library reports a full disk without a HyprError, the CLI still prints one line."""
    from hyprstream_tui import cli

    def boom(args):
        raise exc

    parser = cli.build_parser
    monkeypatch.setattr(cli, "build_parser", lambda *verb: _with_handler(parser(*verb), boom))
    assert cli.main(["model", "list"]) == 6
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: Not enough disk space") and "\n" not in err, err
    with pytest.raises(type(exc)):  # --debug shows the traceback
        cli.main(["--debug", "model", "list"])


def _with_handler(parser, handler):
    for action in parser._subparsers._group_actions:
        action.choices["model"]._subparsers._group_actions[0].choices["list"].set_defaults(func=handler)
    return parser

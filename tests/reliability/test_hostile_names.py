"""Promise 3 of the reliability suite: hostile names never escape.

Every name in `HOSTILE` (over 100: traversal, absolute and home paths, control characters, ref-illegal
names, option injection, very long names, Unicode look-alikes, Windows drive/UNC/device forms,
percent-encoding, glob and shell metacharacters) is fed to every CLI command and API field that
takes a model, adapter, tag, revision or file name. Each attempt must end with one `error: ...`
line (no traceback) and a non-zero exit code (HTTP: 400/404 in OpenAI's error shape, never 5xx),
and write nothing: the whole tmp tree (the store, a sentinel folder beside it, the fake $HOME, the
HF cache, the working directory) has the same paths and mtimes before and after, and no path the
name could point at appears.

The full corpus runs through the real entry point in-process (`hyprstream_tui.cli.main(argv)`, what
the console script calls); a representative subset runs as real `hyprstream` subprocesses.
A Hypothesis property closes it: whatever the validator accepts resolves inside its root and is
a valid git ref component.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import subprocess
import sys
import urllib.parse
from pathlib import Path, PurePosixPath

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from tests.reliability.hostile_corpus import HOSTILE, argv_safe, printable

REPO_ROOT = Path(__file__).resolve().parents[2]
LONG = os.environ.get("HYPRSTREAM_LONG_TESTS") == "1"  # every server request streamed and not; more examples


# ---- the world: a store beside a sentinel, everything under one tmp root ------------------------
class World:
    def __init__(self, root: Path, src: Path) -> None:
        self.root = root
        self.home = root / "home"
        self.sentinel = root / "sentinel"
        self.fakehome = root / "fakehome"
        self.hf = root / "hf"
        self.cwd = root / "cwd"
        self.out = root / "out"
        self.src = src  # the tiny model folder to import from (inside root)
        self.last: dict | None = None  # the latest snapshot

    def snapshot(self) -> dict[str, tuple[int, int, int]]:
        """Every path under the root with (mtime_ns, size, mode); directories included, so a
        file created and removed again still shows in its folder's mtime."""
        out = {}
        st = os.lstat(self.root)
        out["."] = (st.st_mtime_ns, st.st_size, st.st_mode)
        for dirpath, dirnames, filenames in os.walk(self.root):
            for name in dirnames + filenames:
                path = os.path.join(dirpath, name)
                st = os.lstat(path)
                out[os.path.relpath(path, self.root)] = (st.st_mtime_ns, st.st_size, st.st_mode)
        return out

    def targets(self, name: str) -> list[Path]:
        """Paths a hostile name could make something appear at, if it escaped."""
        if "\x00" in name or not name:
            return []
        out = []
        for base in (self.cwd, self.home, self.home / "models", self.home / "models" / "working",
                     self.home / "cache", self.home / "locks"):
            for candidate in (base / name, base / f"model-{name}.lock"):
                out.append(candidate)
        if name.startswith("~"):
            out.append(Path(name).expanduser())
        out.append(Path(name))
        return [p for p in out if len(str(p).encode("utf-8", "surrogatepass")) < 4000]


def _exists(path: Path) -> bool:
    try:
        return os.path.lexists(path)
    except (ValueError, OSError):
        return False


@pytest.fixture(scope="module")
def world(tmp_path_factory, tiny_model_src):
    import shutil

    root = tmp_path_factory.mktemp("hostile")
    w = World(root, root / "src" / "tiny")
    shutil.copytree(tiny_model_src, w.src)
    for d in (w.sentinel, w.fakehome, w.hf, w.cwd, w.out):
        d.mkdir()
    (w.sentinel / "keep.txt").write_text("untouched\n")
    env = {"HYPRSTREAM_HOME": str(w.home), "HOME": str(w.fakehome), "HF_HOME": str(w.hf),
           "HF_HUB_OFFLINE": "1", "XDG_CACHE_HOME": str(w.fakehome / ".cache"), "COLUMNS": "200"}
    with pytest.MonkeyPatch.context() as mp:
        for key, value in env.items():
            mp.setenv(key, value)
        mp.delenv("HF_HUB_CACHE", raising=False)
        mp.delenv("HUGGINGFACE_HUB_CACHE", raising=False)
        mp.chdir(w.cwd)
        from hyprstream_tui.settings import Paths
        from hyprstream_tui.store import Store

        store = Store(Paths.from_env(w.home))
        store.import_model(w.src, name="tiny")
        store.create_adapter("tiny", "qa", rank=4, alpha=8.0, target_modules=("q_proj", "v_proj"))
        store.write_files("tiny", "qa", {"data/samples.jsonl": b'{"input": "a", "output": "b"}\n'},
                          "Add a sample")
        store.tag("tiny", "qa", "v1")
        w.store = store
        w.env = env
        yield w


# ---- the entry points -------------------------------------------------------------------------
def _argvs(w: World, h: str) -> dict[str, list[str]]:
    """Every CLI use of a name; options as --opt=VALUE and positionals after `--`, so that the
    value reaches hyprstream rather than argparse's option parser."""
    out = str(w.out / "x.safetensors")
    return {
        "model import --name": ["model", "import", f"--name={h}", "--", str(w.src)],
        "model info": ["model", "info", "--", h],
        "model rm --yes": ["model", "rm", "--yes", "--", h],
        "model pull ORG/NAME": ["model", "pull", "--", f"org/{h}"],
        "model pull REPO": ["model", "pull", "--", h],
        "model pull --revision": ["model", "pull", f"--revision={h}", "--", "org/tiny2"],
        "model pull --name": ["model", "pull", f"--name={h}", "--", "org/tiny2"],
        "lora create --name": ["lora", "create", f"--name={h}", "--base-model=tiny"],
        "lora create --base-model": ["lora", "create", "--name=fresh", f"--base-model={h}"],
        "lora list": ["lora", "list", "--", h],
        "lora log ADAPTER": ["lora", "log", "--", h],
        "lora log MODEL:ADAPTER": ["lora", "log", "--", f"tiny:{h}"],
        "lora log --model": ["lora", "log", f"--model={h}", "--", "qa"],
        "lora tag LABEL": ["lora", "tag", "--", "tiny:qa", h],
        "lora tag ADAPTER": ["lora", "tag", "--", h, "v2"],
        "lora tag --commit": ["lora", "tag", f"--commit={h}", "--", "tiny:qa", "v3"],
        "lora rollback TARGET": ["lora", "rollback", "--", "tiny:qa", h],
        "lora rollback ADAPTER": ["lora", "rollback", "--", h, "v1"],
        "lora train sample": ["lora", "train", "sample", "--input=q", "--output=a", "--", h],
        "lora train start": ["lora", "train", "start", "--steps=1", "--", f"tiny:{h}"],
        "lora train status": ["lora", "train", "status", "--", h],
        "lora train stop": ["lora", "train", "stop", "--no-wait", "--", h],
        "lora export ADAPTER": ["lora", "export", f"--output={out}", "--", h],
        "lora export --commit": ["lora", "export", f"--output={out}", f"--commit={h}", "--", "tiny:qa"],
        "lora merge ADAPTER": ["lora", "merge", "--name=merged", "--", h],
        "lora merge --name": ["lora", "merge", f"--name={h}", "--", "tiny:qa"],
        "infer MODEL": ["infer", "--prompt=hi", "--max-tokens=1", "--", h],
        "infer MODEL:ADAPTER": ["infer", "--prompt=hi", "--max-tokens=1", "--", f"tiny:{h}"],
        "infer MODEL:ADAPTER@REV": ["infer", "--prompt=hi", "--max-tokens=1", "--", f"tiny:qa@{h}"],
    }


ENTRY_POINTS = list(_argvs(World(Path("/x"), Path("/x")), "h"))
# Reserved for model names only (the store's own folders): ordinary names for an adapter or a tag.
MODEL_ONLY = {"working", "WORKING", "tmp", "cache", "Cache"}
NAMES_AN_ADAPTER_OR_TAG = {"lora create --name", "lora tag LABEL"}


def corpus_for(entry: str) -> list[str]:
    return [h for h in HOSTILE if not (entry in NAMES_AN_ADAPTER_OR_TAG and h in MODEL_ONLY)]


@pytest.fixture(scope="module")
def fast_parser():
    """`cli.main` builds its argparse tree on every call (~25 ms); build it once for the thousands of
    in-process calls. Parsing, dispatch and error handling stay `main`'s own."""
    from hyprstream_tui import cli

    parser = cli.build_parser()
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(cli, "build_parser", lambda *verb: parser)  # the whole tree serves every verb
        yield


def run_main(w: World, argv: list[str]) -> tuple[int, str, str]:
    """`hyprstream --home HOME ARGV` in this process: (exit code, stdout, stderr)."""
    from hyprstream_tui import cli

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = cli.main([f"--home={w.home}", *argv])
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else 1
        except Exception as exc:  # a crash: what a user would see as a traceback
            import traceback

            traceback.print_exc(file=err)
            code = f"raised {type(exc).__name__}: {exc}"
    return code, out.getvalue(), err.getvalue()


def problems_of(code, stdout: str, stderr: str) -> list[str]:
    found = []
    err = stderr.strip()
    if not isinstance(code, int):
        found.append(str(code))
    elif code == 0:
        found.append(f"exit code 0 (stdout {stdout.strip()[:120]!r})")
    if "Traceback" in stderr:
        found.append("traceback")
    if not err.startswith("error: "):
        found.append(f"stderr does not start with 'error: ': {err[:160]!r}")
    elif "\n" in err:
        found.append(f"more than one line: {err[:200]!r}")
    return found


def check_one(w: World, entry: str, h: str, *, runner=run_main, before: dict | None = None) -> list[str]:
    """Run one attempt; `before` may be the previous attempt's snapshot (nothing may change)."""
    argv = _argvs(w, h)[entry]
    targets = [p for p in w.targets(h) if not _exists(p)]
    before = before if before is not None else w.snapshot()
    code, stdout, stderr = runner(w, argv)
    after = w.last = w.snapshot()
    found = problems_of(code, stdout, stderr)
    if after != before:
        added = sorted(set(after) - set(before))
        removed = sorted(set(before) - set(after))
        changed = sorted(k for k in set(after) & set(before) if after[k] != before[k])
        found.append(f"the tree changed: added {added[:5]}, removed {removed[:5]}, changed {changed[:5]}")
    appeared = [str(p) for p in targets if _exists(p)]
    if appeared:
        found.append(f"appeared: {appeared}")
    return [f"{entry} {printable(h)}: {p}" for p in found]


@pytest.mark.parametrize("entry", ENTRY_POINTS)
def test_every_hostile_name_is_refused_by_every_cli_entry_point(world, fast_parser, entry):
    corpus = corpus_for(entry)
    failures = []
    world.last = None
    for h in corpus:
        failures += check_one(world, entry, h, before=world.last)
    assert not failures, f"{len(failures)} of {len(corpus)} names got through {entry}:\n" + "\n".join(failures[:40])


def test_hostile_folder_names_are_refused_by_import(world, fast_parser, tmp_path_factory):
    """`model import DIR` without --name takes the folder's name: a hostile folder name is refused."""
    import shutil

    base = tmp_path_factory.mktemp("hostile-folders")
    tried, failures = 0, []
    for h in HOSTILE:
        if not h or "/" in h or h in (".", "..") or not argv_safe(h) or len(h.encode()) > 255:
            continue
        folder = base / h
        try:
            folder.mkdir()
        except OSError:
            continue
        for f in world.src.iterdir():
            os.link(f, folder / f.name) if f.is_file() else shutil.copytree(f, folder / f.name)
        tried += 1
        targets = [p for p in world.targets(h) if not _exists(p)]
        before = world.snapshot()
        code, stdout, stderr = run_main(world, ["model", "import", "--", str(folder)])
        found = problems_of(code, stdout, stderr)
        if world.snapshot() != before:
            found.append("the store changed")
        found += [f"appeared: {p}" for p in targets if _exists(p)]
        failures += [f"folder {printable(h)}: {p}" for p in found]
    print(f"\nfolder names refused by model import: {tried}")
    assert tried >= 60, tried
    assert not failures, "\n".join(failures[:40])


def test_hostile_file_names_inside_an_import_folder_stay_inside_the_model(world, fast_parser, tmp_path_factory):
    """A file name is refused with one line, or (a plain name such as `a b c` or `CON`) lands as
    exactly that file inside the new model's repository, and nowhere else."""
    base = tmp_path_factory.mktemp("hostile-files")
    fresh = world.home / "models" / "fresh"
    tried, accepted, failures = 0, 0, []
    for i, h in enumerate(HOSTILE):
        if not h or "/" in h or h in (".", "..") or not argv_safe(h) or len(h.encode()) > 255:
            continue
        if not LONG and i % 3:  # an accepted name is a whole import (~0.3 s): the long run tries all
            continue
        folder = base / f"m{i}"
        folder.mkdir()
        for f in world.src.iterdir():
            os.link(f, folder / f.name)
        try:
            (folder / h).write_bytes(b"hostile\n")
        except OSError:
            continue
        tried += 1
        targets = [p for p in world.targets(h) if not _exists(p)]
        before = world.snapshot()
        code, stdout, stderr = run_main(world, ["model", "import", "--link", "--name=fresh", "--", str(folder)])
        after = world.snapshot()
        if code == 0:
            accepted += 1
            changed = {k for k in set(before) | set(after) if before.get(k) != after.get(k)}
            elsewhere = sorted(k for k in changed if not k.startswith("home/models/fresh")
                               and k not in ("home/models", "home/locks", "home/locks/model-fresh.lock"))
            landed = fresh / h
            if elsewhere:
                failures.append(f"file {printable(h)}: wrote outside the new model: {elsewhere[:5]}")
            if not landed.is_file() or landed.resolve().parent != fresh.resolve():
                failures.append(f"file {printable(h)}: not stored as a plain file of the model")
            world.store.remove_model("fresh")
        else:
            found = problems_of(code, stdout, stderr)
            if after != before:
                found.append("the store changed")
            failures += [f"file {printable(h)}: {p}" for p in found]
        failures += [f"file {printable(h)}: appeared: {p}" for p in targets if _exists(p)]
    print(f"\nfile names inside an import folder: {tried} tried, {accepted} stored inside the model, "
          f"{tried - accepted} refused")
    assert tried >= (100 if LONG else 30) and not fresh.exists()
    assert not failures, "\n".join(failures[:40])


# A representative subset through the real console entry point (a subprocess each, ~0.5 s).
SUBPROCESS_CASES = [
    ("model import --name", "../../sentinel/owned"),
    ("model info", "/etc/passwd"),
    ("model rm --yes", ".."),
    ("model pull ORG/NAME", "a..b"),
    ("model pull --revision", "../../x"),
    ("lora create --name", "a.lock"),
    ("lora create --base-model", "~root"),
    ("lora log MODEL:ADAPTER", "a@{1}"),
    ("lora tag LABEL", "@{u}"),
    ("lora tag LABEL", "-flag"),
    ("lora rollback TARGET", "HEAD~1"),
    ("lora train sample", "C:\\x"),
    ("lora train status", "\\\\server\\share"),
    ("lora export ADAPTER", "a\u2215b"),
    ("lora merge --name", "CON"),
    ("infer MODEL:ADAPTER@REV", "tiny\u202e"),
    ("model info", "a\nb"),
    ("lora create --name", "x" * 4096),
]
if not LONG:  # about 0.6 s each: the default run takes every other case
    SUBPROCESS_CASES = SUBPROCESS_CASES[::2]


def run_subprocess(w: World, argv: list[str]) -> tuple[int, str, str]:
    env = {**os.environ, **w.env}
    proc = subprocess.run([sys.executable, "-m", "hyprstream_tui", f"--home={w.home}", *argv],
                          capture_output=True, text=True, env=env, cwd=w.cwd, timeout=120)
    return proc.returncode, proc.stdout, proc.stderr


def test_hostile_names_through_real_processes(world):
    failures = []
    for entry, h in SUBPROCESS_CASES:
        failures += check_one(world, entry, h, runner=run_subprocess)
    # and unquoted, as a user would type them: option injection reaches argparse, never a file
    for argv in (["model", "info", "-flag"], ["lora", "create", "--name", "--help=x", "--base-model", "tiny"],
                 ["model", "rm", "--yes", "--home=/tmp/x"]):
        before = world.snapshot()
        code, _out, err = run_subprocess(world, argv)
        if code == 0 or "Traceback" in err or world.snapshot() != before:
            failures.append(f"{argv}: exit {code}, {err.strip()[-200:]!r}")
    assert not failures, "\n".join(failures)


# ---- the server: the `model` field of /v1/completions and /v1/chat/completions ------------------
@pytest.fixture(scope="module")
def hostile_server(world):
    from hyprstream_tui.engine.engine import Engine
    from hyprstream_tui.engine.loader import LoadOptions
    from tests.server.live import live_server, make_app

    engine = Engine(store=world.store, options=LoadOptions(dtype="float32"), threads=1)
    with live_server(make_app(engine, max_batch=2, max_queue=4)) as live:
        yield live
    engine.close()


def _api_problems(response) -> list[str]:
    found = []
    if response.status_code not in (400, 404):
        found.append(f"status {response.status_code}: {response.text[:160]!r}")
    try:
        error = response.json()["error"]
        assert isinstance(error["message"], str) and error["message"] and "\n" not in error["message"]
        assert {"type", "param", "code"} <= set(error)
    except Exception:
        found.append(f"not OpenAI's error shape: {response.text[:160]!r}")
    return found


def server_posts(h: str) -> list[tuple[str, dict]]:
    """The POSTs that carry `h` as a model name, in four forms. The default run takes each form once,
    alternating endpoint and streaming; the long run sends every combination."""
    posts = []
    for i, model in enumerate((h, f"tiny:{h}", f"tiny:qa@{h}", f"{h}:qa")):
        for stream in (False, True) if LONG else ((i + len(h)) % 2 == 1,):
            both = [("/v1/completions", {"model": model, "prompt": "hi", "max_tokens": 1, "stream": stream}),
                    ("/v1/chat/completions", {"model": model, "max_tokens": 1, "stream": stream,
                                              "messages": [{"role": "user", "content": "hi"}]})]
            posts += both if LONG else [both[i % 2]]
    return posts


def quoted_model(h: str) -> str:
    """`h` as the path segment of GET /v1/models/{id}: dots encoded too, or the client would resolve
    `.` and `..` itself."""
    return urllib.parse.quote(h.encode("utf-8", "surrogatepass"), safe="").replace(".", "%2E")


def test_every_hostile_name_is_refused_by_the_server(world, hostile_server):
    import httpx

    failures, tried = [], 0
    with httpx.Client(base_url=hostile_server.url, timeout=60) as client:
        # listing models caches each adapter's snapshot (derived data): let that happen first
        listed = {card["id"] for card in client.get("/v1/models").json()["data"]}
        for h in HOSTILE:
            before = world.snapshot()
            for path, body in server_posts(h):
                tried += 1
                # surrogates are not valid UTF-8: send them \u-escaped, as JSON allows
                response = client.post(path, content=json.dumps(body).encode(),
                                       headers={"Content-Type": "application/json"})
                failures += [f"{path} model={printable(body['model'])} stream={body['stream']}: {p}"
                             for p in _api_problems(response)]
            quoted = quoted_model(h)
            if quoted:
                tried += 1
                response = client.get(f"/v1/models/{quoted}")
                # Starlette's path regex lets `$` match before a final newline: `tiny%0A` finds `tiny`,
                # an existing model, which is no escape; anything else must be a 404
                found = response.status_code == 200 and response.json().get("id") in listed
                if not found and not (response.status_code == 404 and not _api_problems(response)):
                    failures.append(f"GET /v1/models/{quoted[:40]}: {response.status_code} {response.text[:100]!r}")
            if world.snapshot() != before:
                failures.append(f"{printable(h)}: the tree changed")
        assert client.get("/health").status_code == 200
    print(f"\nserver requests with a hostile model name: {tried}")
    assert not failures, f"{len(failures)} failures in {tried} requests:\n" + "\n".join(failures[:40])


def test_the_sweep_covers_every_name_everywhere():
    """The sweep's size, as the module docstring promises it (printed for the issue's closing note:
    run with -s): over 100 names; every one through every CLI entry point (names reserved for model
    folders stay ordinary names where an adapter or tag is named); subprocess cases that reach both
    command families; every name in each of the four model forms of the server, plus its GET."""
    cli_calls = {entry: len(corpus_for(entry)) for entry in ENTRY_POINTS}
    subprocess_calls = len(SUBPROCESS_CASES) + 3  # + the three unquoted option injections
    server_requests = sum(len(server_posts(h)) + bool(quoted_model(h)) for h in HOSTILE)
    print(f"\nhostile names: {len(HOSTILE)}; CLI entry points: {len(ENTRY_POINTS)} "
          f"(+ import by folder name); in-process CLI attempts: {sum(cli_calls.values())}; "
          f"subprocess attempts: {subprocess_calls}; server requests: {server_requests}")
    assert len(HOSTILE) > 100 and len(ENTRY_POINTS) >= 25, (len(HOSTILE), len(ENTRY_POINTS))
    reserved = len(set(HOSTILE) & MODEL_ONLY)
    assert all(n == len(HOSTILE) - (reserved if entry in NAMES_AN_ADAPTER_OR_TAG else 0)
               for entry, n in cli_calls.items()), cli_calls
    assert {"model", "lora"} <= {entry.split()[0] for entry, _ in SUBPROCESS_CASES}, SUBPROCESS_CASES
    assert subprocess_calls >= (21 if LONG else 12), subprocess_calls
    forms = [sorted({body["model"] for _, body in server_posts(h)}) for h in HOSTILE]
    assert all(len(f) == 4 for f in forms), [f for f in forms if len(f) != 4][:3]
    assert server_requests >= len(HOSTILE) * (17 if LONG else 5) - 1, server_requests


# ---- the property: what the validator accepts stays inside its root -------------------------
_HOSTILE_CHARS = list("./\\~-_:@{}[]^?*!$`'\" \t\n\r\x00%#;,=+|&<>") + [
    "\uff0f", "\u2215", "\u2024", "\uff0e", "\u202e", "\u200d", "\u200b", "\u043e", ".lock", "..", "HEAD", "a", "Z", "0"]
names_text = st.one_of(
    st.text(max_size=80),
    st.lists(st.sampled_from(_HOSTILE_CHARS), max_size=30).map("".join),
    st.from_regex(r"[A-Za-z0-9][A-Za-z0-9._-]{0,70}", fullmatch=True),
    st.sampled_from(HOSTILE),
)


@settings(max_examples=5000 if LONG else 400, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=names_text)
@example(text="CON")
@example(text="a.b-c_d")
def test_any_accepted_name_resolves_inside_its_root_and_is_a_valid_ref(tmp_path, text):
    import pygit2

    from hyprstream_tui import names
    from hyprstream_tui.errors import InvalidInput
    from hyprstream_tui.settings import Paths
    from hyprstream_tui.store.lfs import LfsObjects

    paths = Paths.from_env(tmp_path / "home")
    roots = {"models": paths.models, "working": paths.working, "locks": paths.locks,
             "snapshots": paths.cache / "snapshots"}
    lfs_root = LfsObjects(paths.models / "m" / ".git").root

    def inside(root: Path, joined: Path) -> bool:
        r = root.resolve()
        j = joined.resolve()
        return j == r or r in j.parents

    for check in (names.model_name, names.adapter_name, names.tag_label):
        try:
            ok = check(text)
        except InvalidInput as exc:
            assert "\n" not in exc.message
            continue
        assert ok == text
        for root in roots.values():
            joined = root / ok
            assert joined.resolve().parent == root.resolve(), (check.__name__, text)
            assert names.inside(root, ok) == joined.resolve()
        assert pygit2.reference_is_valid_name(f"refs/heads/{ok}")
        assert pygit2.reference_is_valid_name(f"refs/tags/{ok}/{ok}")
        assert pygit2.reference_is_valid_name(f"refs/heads/adapter/{ok}")
        if check is names.model_name:
            assert paths.model_dir(ok).parent == paths.models
            assert ok.lower() not in names.RESERVED_MODEL_NAMES
    try:
        rel = names.repo_relpath(text)
    except InvalidInput:
        pass
    else:
        for root in (paths.models / "m", paths.working / "u", lfs_root):
            assert inside(root, root / rel) and (root / rel).resolve() != root.resolve()
        assert ".git" not in [p.lower() for p in PurePosixPath(rel).parts]
    try:
        rev = names.revision(text)
    except InvalidInput:
        pass
    else:
        hf_refs = tmp_path / "hf" / "refs"
        assert inside(hf_refs, hf_refs / rev)


@settings(max_examples=3000 if LONG else 300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.one_of(st.binary(max_size=220), st.builds(
    lambda oid, size: f"version https://git-lfs.github.com/spec/v1\noid sha256:{oid}\nsize {size}\n".encode(),
    st.text(alphabet="0123456789abcdef./\\~", min_size=60, max_size=70), st.integers(0, 10**12))))
def test_any_parsed_lfs_pointer_resolves_inside_the_lfs_root(tmp_path, data):
    """An LFS object path comes from a pointer inside a (possibly hostile) repository."""
    from hyprstream_tui.store.lfs import LfsObjects, Pointer

    pointer = Pointer.parse(data)
    if pointer is None:
        return
    lfs = LfsObjects(tmp_path / "repo" / ".git")
    path = lfs.path(pointer.oid).resolve()
    assert lfs.root.resolve() in path.parents
    assert len(pointer.oid) == 64 and set(pointer.oid) <= set("0123456789abcdef")


# ---- what this suite found, pinned -----------------------------------------------------------
@pytest.mark.parametrize("bad", ["HEAD", "FETCH_HEAD", "orig_head", "CON", "con", "nul.txt", "Aux", "COM1", "lpt9.safetensors"])
def test_git_and_windows_reserved_names_are_refused(bad):
    from hyprstream_tui import names
    from hyprstream_tui.errors import InvalidInput

    for check in (names.model_name, names.adapter_name, names.tag_label):
        with pytest.raises(InvalidInput, match="reserved"):
            check(bad)
    assert names.model_name("console") == "console" and names.adapter_name("HEADS") == "HEADS"


@pytest.mark.parametrize("spec", ["tiny\n", "\ntiny", "tiny\t", "tiny\u202e", "ti\u200dny", "tiny:qa@v1\x00", "tiny\ud800"])
def test_a_model_spec_with_control_or_invisible_characters_is_refused(spec):
    from hyprstream_tui.engine.sources import parse_spec
    from hyprstream_tui.errors import InvalidInput

    with pytest.raises(InvalidInput, match="control or invisible"):
        parse_spec(spec)
    assert parse_spec(" tiny:qa@v1 ").rev == "v1"


def test_huge_or_unencodable_revisions_are_a_clear_error_and_take_no_lock(world):
    from hyprstream_tui.errors import InvalidInput

    lock = world.home / "locks" / "model-tiny.lock"
    before = world.snapshot()
    for rev in ("b" * 4096, "a\ud800b", "a\x00b", ""):
        with pytest.raises(InvalidInput):
            world.store.resolve_adapter("tiny", "qa", rev)
        with pytest.raises(InvalidInput):
            world.store.tag("tiny", "qa", "v9", commit=rev)
        with pytest.raises(InvalidInput):
            world.store.rollback("tiny", "qa", rev)
    with pytest.raises(InvalidInput):
        world.store.tag("tiny", "qa", "../x")
    assert world.snapshot() == before, "a refused tag or rollback touched the store (or its lock)"
    assert lock.exists()


def test_an_empty_model_is_not_a_missing_one(world, fast_parser):
    for argv in (["lora", "list", ""], ["lora", "log", "--model=", "qa"], ["lora", "log", ":qa"],
                 ["lora", "tag", "--commit=", "tiny:qa", "v8"]):
        code, stdout, stderr = run_main(world, argv)
        assert code != 0 and stderr.startswith("error: ") and stderr.count("\n") == 1, (argv, code, stdout, stderr)

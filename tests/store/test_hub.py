"""`model pull`'s download half against a real HTTP server that speaks the hub's API (FakeHub)."""

from __future__ import annotations

import hashlib
import json
import pickle
import socket
import threading
import time
from pathlib import Path

import pytest

from hyprstream_tui.errors import Cancelled, HubError, InvalidInput, NotFound, UnsafeContent
from hyprstream_tui.store import hub

REPO = "org/tiny"
BIG = "model.safetensors"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    """A small model folder: config, tokenizer, README and ~1.6 MB of safetensors weights."""
    import numpy as np
    from safetensors.numpy import save_file

    root = tmp_path_factory.mktemp("tiny-src")
    rng = np.random.default_rng(0)
    save_file({"embed.weight": rng.standard_normal((400, 1000)).astype(np.float32)}, root / BIG)
    (root / "config.json").write_text(json.dumps({"model_type": "qwen2", "architectures": ["Qwen2ForCausalLM"]}))
    (root / "tokenizer.json").write_text(json.dumps({"version": "1.0", "model": {"type": "BPE", "vocab": {"a": 0}}}))
    (root / "README.md").write_text("# tiny\n")
    return root


def cache_root(tmp_path: Path) -> Path:
    return tmp_path / "hf-home" / "hub" / "models--org--tiny"


def cache_files(tmp_path: Path) -> list[Path]:
    root = tmp_path / "hf-home" / "hub"
    return [p for p in root.rglob("*") if (p.is_file() or p.is_symlink()) and ".locks" not in p.parts]


# -- the good path -------------------------------------------------------------------------------
def test_fetch_downloads_verified_files_into_the_hf_cache(hub_server, model_dir, tmp_path):
    repo = hub_server.add_repo(REPO, model_dir, branches=("main", "v1.0"))
    events: list[hub.DownloadProgress] = []
    snap = hub.fetch(REPO, revision="v1.0", progress=events.append)

    assert (snap.repo_id, snap.revision, snap.commit) == (REPO, "v1.0", repo.commit)
    assert sorted(f.relpath for f in snap.files) == ["README.md", "config.json", BIG, "tokenizer.json"]
    for f in snap.files:
        data = (model_dir / f.relpath).read_bytes()
        assert f.path.read_bytes() == data and not f.path.is_symlink()
        assert f.sha256 == hashlib.sha256(data).hexdigest() and f.size == len(data)
        assert f.lfs == (f.relpath == BIG)
        assert cache_root(tmp_path) in f.path.parents
    assert not [p for p in cache_files(tmp_path) if p.name.endswith(".incomplete")]
    # huggingface_hub itself finds them, offline, by commit and by the revision's ref
    from huggingface_hub import hf_hub_download

    cache = tmp_path / "hf-home" / "hub"
    for rev in (snap.commit, "v1.0"):
        found = hf_hub_download(REPO, BIG, revision=rev, cache_dir=cache, local_files_only=True)
        assert Path(found).samefile(next(f.path for f in snap.files if f.relpath == BIG))


def test_progress_reports_every_file_up_to_its_total(hub_server, model_dir):
    hub_server.add_repo(REPO, model_dir)
    events: list[hub.DownloadProgress] = []
    snap = hub.fetch(REPO, progress=events.append)

    total = sum(f.size for f in snap.files)
    assert [e.bytes_done for e in events] == sorted(e.bytes_done for e in events)
    assert events[-1].bytes_done == events[-1].bytes_total == total
    for f in snap.files:
        mine = [e for e in events if e.relpath == f.relpath]
        assert mine[0].done == 0 and mine[-1].done == mine[-1].total == f.size
        assert {e.count for e in mine} == {4}
    big = [e for e in events if e.relpath == BIG]
    assert 4 <= len(big) <= 12  # bytes as they arrive, throttled


def test_lfs_bytes_come_from_the_cdn_without_the_token(hub_server, model_dir):
    hub_server.add_repo(REPO, model_dir, token="hf_secret")
    with pytest.raises(NotFound, match="HF_TOKEN"):
        hub.fetch(REPO)
    snap = hub.fetch(REPO, token="hf_secret")

    assert len(snap.files) == 4
    cdn = [h for h in hub_server.hits if h.cdn]
    assert cdn and all(h.auth is None for h in cdn)
    assert all(h.auth == "Bearer hf_secret" for h in hub_server.hits if not h.cdn and h.status == 200)


# -- interruption, resume, cancel ----------------------------------------------------------------
def test_cut_download_resumes_with_a_range_request(hub_server, model_dir):
    hub_server.add_repo(REPO, model_dir)
    size = (model_dir / BIG).stat().st_size
    hub_server.cut_after(REPO, BIG, 600_000)
    snap = hub.fetch(REPO)

    gets = hub_server.file_hits(BIG)
    assert len(gets) == 2 and gets[0].range is None and gets[0].sent == 600_000
    start = int(gets[1].range.removeprefix("bytes=").rstrip("-"))
    assert 0 < start <= 600_000 and gets[1].status == 206
    assert hub_server.bytes_served(BIG) < 2 * size
    assert next(f for f in snap.files if f.relpath == BIG).path.read_bytes() == (model_dir / BIG).read_bytes()


def test_cancelled_pull_leaves_a_partial_that_the_next_pull_continues(hub_server, model_dir, tmp_path):
    hub_server.add_repo(REPO, model_dir)
    size = (model_dir / BIG).stat().st_size
    cancel = threading.Event()

    def stop_midway(p: hub.DownloadProgress) -> None:
        if p.relpath == BIG and 0 < p.done < p.total:
            cancel.set()

    with pytest.raises(Cancelled):
        hub.fetch(REPO, progress=stop_midway, cancel=cancel)
    partials = [p for p in cache_files(tmp_path) if p.name.endswith(".incomplete")]
    assert len(partials) == 1 and 0 < partials[0].stat().st_size < size
    kept = partials[0].stat().st_size
    assert not any(p.name == BIG for p in cache_files(tmp_path))  # nothing half-done is visible

    snap = hub.fetch(REPO)
    last = hub_server.file_hits(BIG)[-1]
    assert last.range == f"bytes={kept}-" and last.sent == size - kept  # only the rest was sent
    assert next(f for f in snap.files if f.relpath == BIG).sha256 == hashlib.sha256((model_dir / BIG).read_bytes()).hexdigest()
    assert not [p for p in cache_files(tmp_path) if p.name.endswith(".incomplete")]


def test_cancel_before_start_downloads_nothing(hub_server, model_dir, tmp_path):
    hub_server.add_repo(REPO, model_dir)
    cancel = threading.Event()
    cancel.set()
    with pytest.raises(Cancelled, match="run it again"):
        hub.fetch(REPO, cancel=cancel)
    assert not hub_server.file_hits(BIG) and not cache_files(tmp_path)


# -- verification --------------------------------------------------------------------------------
def test_sha256_mismatch_is_refused_and_nothing_is_left(hub_server, model_dir, tmp_path):
    hub_server.add_repo(REPO, model_dir)
    hub_server.corrupt(REPO, BIG)
    with pytest.raises(HubError, match="sha256") as err:
        hub.fetch(REPO)
    assert "\n" not in str(err.value)
    sha = hashlib.sha256((model_dir / BIG).read_bytes()).hexdigest()
    leftovers = [p.name for p in cache_files(tmp_path)]
    assert not [n for n in leftovers if n.startswith(sha) or n == BIG], leftovers

    hub_server.corrupt(REPO, BIG, on=False)  # the next pull is not poisoned by the first
    snap = hub.fetch(REPO)
    assert next(f for f in snap.files if f.relpath == BIG).sha256 == sha


def test_small_file_is_checked_against_its_git_blob_id(hub_server, model_dir, tmp_path):
    hub_server.add_repo(REPO, model_dir)
    hub_server.corrupt(REPO, "config.json")
    with pytest.raises(HubError, match="config.json .*git blob id"):
        hub.fetch(REPO)
    names = [p.name for p in cache_files(tmp_path)]
    assert "config.json" not in names and not [n for n in names if n.endswith(".incomplete")]


def test_second_fetch_reuses_the_cache(hub_server, model_dir):
    hub_server.add_repo(REPO, model_dir)
    first = hub.fetch(REPO)
    hub_server.hits.clear()
    second = hub.fetch(REPO)

    assert second == first
    fetched = [h for h in hub_server.hits if h.cdn or "/resolve/" in h.path]
    assert fetched == []  # not one byte, not even a HEAD: only model_info was asked


def test_a_corrupted_cache_blob_is_replaced_not_reused(hub_server, model_dir):
    hub_server.add_repo(REPO, model_dir)
    blob = next(f.path for f in hub.fetch(REPO).files if f.relpath == BIG)
    with open(blob, "r+b") as f:
        f.seek(1000)
        f.write(b"\0\1\2\3")
    snap = hub.fetch(REPO)

    assert len(hub_server.file_hits(BIG)) == 2
    assert next(f for f in snap.files if f.relpath == BIG).path.read_bytes() == (model_dir / BIG).read_bytes()


# -- refusals ------------------------------------------------------------------------------------
def test_unknown_repo_is_not_found_quickly(hub_server):
    start = time.monotonic()
    with pytest.raises(NotFound, match="No model org/missing on the hub"):
        hub.fetch("org/missing")
    assert time.monotonic() - start < 2


def test_unknown_revision_is_not_found(hub_server, model_dir):
    hub_server.add_repo(REPO, model_dir)
    with pytest.raises(NotFound, match="revision 'nope'"):
        hub.fetch(REPO, revision="nope")


def test_gated_repo_says_what_to_do(hub_server, model_dir):
    hub_server.add_repo(REPO, model_dir, gated=True)
    with pytest.raises(HubError, match="gated.*HF_TOKEN"):
        hub.fetch(REPO)


def test_unreachable_hub_fails_in_seconds(hub_server, monkeypatch):
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        closed = s.getsockname()[1]
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{closed}")
    start = time.monotonic()
    with pytest.raises(HubError, match="Cannot reach the hub"):
        hub.fetch(REPO)
    assert time.monotonic() - start < 3

    with socket.socket() as silent:  # accepts connections, never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        start = time.monotonic()
        with pytest.raises(HubError, match="did not answer within 0.5 s"):
            hub.fetch(REPO, endpoint=f"http://127.0.0.1:{silent.getsockname()[1]}", timeout=0.5)
        assert time.monotonic() - start < 3


def test_offline_mode_is_named(hub_server, monkeypatch):
    import huggingface_hub.constants as hf_constants

    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(HubError, match="HF_HUB_OFFLINE"):
        hub.fetch(REPO)


@pytest.mark.parametrize("bad", ["../../evil.json", "/etc/passwd", ".git/config", "a/../../b", "x\\..\\y", "ok/\x00.json"])
def test_hostile_file_name_from_the_hub_is_refused_before_any_write(hub_server, model_dir, tmp_path, bad):
    hub_server.add_repo(REPO, model_dir, extra_siblings=(bad,))
    with pytest.raises(HubError, match="unsafe file name"):
        hub.fetch(REPO)
    assert not (tmp_path / "hf-home").exists()
    assert not [h for h in hub_server.hits if "/resolve/" in h.path or h.cdn]


def test_hostile_commit_from_the_hub_is_refused(hub_server, model_dir, tmp_path):
    repo = hub_server.add_repo(REPO, model_dir)
    repo.commit = "../../../../tmp/x"
    repo.branches["main"] = repo.commit
    with pytest.raises(HubError, match="no valid commit"):
        hub.fetch(REPO)
    assert not (tmp_path / "hf-home").exists()


@pytest.mark.parametrize("bad", ["../x", "org/name/more", "org/..", "/abs", ""])
def test_bad_repo_id_is_refused_without_a_request(hub_server, bad):
    with pytest.raises(InvalidInput):
        hub.fetch(bad)
    assert hub_server.hits == []


def test_pickle_only_repo_is_refused(hub_server, tmp_path):
    hub_server.add_repo("org/old", files={"config.json": b"{}", "pytorch_model.bin": pickle.dumps({"w": [1.0]})})
    with pytest.raises(UnsafeContent, match="pytorch_model.bin.*`allow_pickle`"):
        hub.fetch("org/old")
    assert not hub_server.file_hits("pytorch_model.bin") and not cache_files(tmp_path)

    snap = hub.fetch("org/old", allow_pickle=True)
    assert sorted(f.relpath for f in snap.files) == ["config.json", "pytorch_model.bin"]


def test_pickle_and_other_frameworks_are_skipped_next_to_safetensors(hub_server, model_dir):
    extra = {"pytorch_model.bin": b"\x80\x04K\x01.", "pytorch_model.bin.index.json": b"{}",
             "tf_model.h5": b"h5", "onnx/model.onnx": b"onnx", ".gitattributes": b"*.bin filter=lfs\n"}
    hub_server.add_repo(REPO, model_dir, files=extra)
    snap = hub.fetch(REPO, allow_pickle=True)

    assert sorted(snap.skipped) == sorted(extra)
    assert BIG in {f.relpath for f in snap.files}
    assert not any(hub_server.file_hits(name) for name in extra)

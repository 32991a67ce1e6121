"""Importing, listing, inspecting and removing models; plain git and git-lfs read the result."""

from __future__ import annotations

import json
import os
import shutil
import struct
from pathlib import Path

import pytest

from hyprstream_tui.errors import Conflict, InvalidInput, NotFound, UnsafeContent
from hyprstream_tui.store.lfs import LfsObjects, Pointer
from hyprstream_tui.store.models import disk_usage
from tests.helpers import assert_one_line_error, git


def lfs_files(repo: Path) -> dict[str, str]:
    """{path: oid} as Debian's git-lfs sees them."""
    out = git(repo, "lfs", "ls-files", "--long").stdout
    return {line.split()[-1]: line.split()[0] for line in out.splitlines() if line.strip()}


def test_import_makes_a_repository_plain_git_and_git_lfs_read(tiny_store, home):
    repo = home / "models" / "tiny"
    assert git(repo, "fsck", "--full", "--strict").returncode == 0
    assert git(repo, "log", "--format=%s", "main").stdout.startswith("Import tiny")
    pointer_blob = git(repo, "cat-file", "-p", "main:model.safetensors").stdout
    pointer = Pointer.parse(pointer_blob.encode())
    assert pointer is not None, pointer_blob
    assert lfs_files(repo) == {"model.safetensors": pointer.oid}
    assert "Git LFS fsck OK" in git(repo, "lfs", "fsck").stdout
    assert ".gitattributes" in git(repo, "ls-tree", "--name-only", "main").stdout
    attrs = git(repo, "check-attr", "filter", "model.safetensors").stdout
    assert "filter: lfs" in attrs


def test_weights_are_stored_once_and_hard_linked(tiny_store, home, tiny_model_src):
    repo = home / "models" / "tiny"
    obj = LfsObjects(repo / ".git")
    oid = git(repo, "lfs", "ls-files", "--long").stdout.split()[0]
    work = repo / "model.safetensors"
    assert os.path.samefile(work, obj.path(oid))
    assert work.read_bytes() == (tiny_model_src / "model.safetensors").read_bytes()


def test_import_adds_the_weights_once_to_disk_usage(store, tmp_path):
    """A 24 MB weights file: the store grows by ~1x its size (copy into LFS + hard link), and by
    ~0 with --link."""
    import numpy as np
    from safetensors.numpy import save_file

    src = tmp_path / "big"
    src.mkdir()
    (src / "config.json").write_text(json.dumps({"model_type": "qwen2", "architectures": ["Qwen2ForCausalLM"]}))
    weights = {"model.layers.0.self_attn.q_proj.weight": np.random.default_rng(0).random((3000, 2000), dtype=np.float32)}
    save_file(weights, str(src / "model.safetensors"))
    size = (src / "model.safetensors").stat().st_size
    before = disk_usage(tmp_path)
    store.import_model(src, name="copied")
    grew = disk_usage(tmp_path) - before
    assert size <= grew < 1.1 * size, (grew, size)
    before = disk_usage(tmp_path)
    store.import_model(src, name="linked", link=True)
    grew_linked = disk_usage(tmp_path) - before
    assert grew_linked < 0.05 * size, (grew_linked, size)


def test_list_and_info_describe_the_model(tiny_store, cli):
    result = cli("model", "list", "--json")
    assert result.returncode == 0, result.stderr
    (row,) = json.loads(result.stdout)
    assert row["name"] == "tiny" and row["architecture"] in ("Qwen2ForCausalLM", "qwen2") and row["model_type"] == "qwen2"
    assert 100_000 < row["parameters"] < 2_000_000 and row["dtype"] == "float32" and row["adapters"] == 0
    assert row["size_bytes"] > 0
    info = json.loads(cli("model", "info", "tiny", "--json").stdout)
    assert info["config"]["model_type"] == "qwen2"
    paths = {f["path"]: f for f in info["files"]}
    assert paths["model.safetensors"]["lfs"] and paths["model.safetensors"]["present"]
    assert not paths["config.json"]["lfs"]
    assert info["branches"] == ["main"] and info["commits"][0]["kind"] == "import"
    text = cli("model", "list")
    assert "tiny" in text.stdout and "qwen2" in text.stdout.lower()


@pytest.mark.parametrize("bad", ["..", "a/b", "/abs", "a\x00b", "a..b", "x.lock", "-dash", "naïve", "a b", "working", "", "a" * 65])
def test_bad_model_names_are_refused_and_nothing_is_written(store, tiny_model_src, home, bad):
    with pytest.raises(InvalidInput):
        store.import_model(tiny_model_src, name=bad)
    assert not any(p for p in (home / "models").glob("*") if not p.name.startswith("."))


def test_duplicate_name_is_refused_and_the_first_model_is_untouched(tiny_store, tiny_model_src, home):
    head = tiny_store.head("tiny")
    with pytest.raises(Conflict):
        tiny_store.import_model(tiny_model_src, name="tiny")
    assert tiny_store.head("tiny") == head
    assert git(home / "models" / "tiny", "fsck", "--full", "--strict").returncode == 0


def copy_model(src: Path, dest: Path) -> Path:
    shutil.copytree(src, dest)
    return dest


def test_folder_without_config_is_refused(store, tiny_model_src, tmp_path):
    bad = copy_model(tiny_model_src, tmp_path / "noconfig")
    (bad / "config.json").unlink()
    with pytest.raises(InvalidInput, match="config.json"):
        store.import_model(bad, name="x")


def test_missing_folder_is_not_found(store, tmp_path):
    with pytest.raises(NotFound):
        store.import_model(tmp_path / "nope", name="x")


@pytest.mark.parametrize("damage", ["truncated", "huge_header", "not_json", "out_of_range", "overlap", "bad_dtype"])
def test_malformed_safetensors_are_refused(store, tiny_model_src, tmp_path, damage, home):
    bad = copy_model(tiny_model_src, tmp_path / damage)
    weights = bad / "model.safetensors"
    data = weights.read_bytes()
    (length,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + length])
    body = data[8 + length:]
    if damage == "truncated":
        weights.write_bytes(data[: len(data) // 2])
    elif damage == "huge_header":
        weights.write_bytes(struct.pack("<Q", 1 << 60) + data[8:])
    elif damage == "not_json":
        weights.write_bytes(struct.pack("<Q", 4) + b"{{{{" + body)
    else:
        name = next(k for k in header if k != "__metadata__")
        if damage == "out_of_range":
            header[name]["data_offsets"] = [0, len(body) + 8]
        elif damage == "overlap":
            other = [k for k in header if k not in ("__metadata__", name)][0]
            header[other]["data_offsets"] = list(header[name]["data_offsets"])
            header[other]["shape"] = header[name]["shape"]
            header[other]["dtype"] = header[name]["dtype"]
        else:
            header[name]["dtype"] = "F33"
        raw = json.dumps(header).encode()
        weights.write_bytes(struct.pack("<Q", len(raw)) + raw + body)
    with pytest.raises(InvalidInput, match="safetensors"):
        store.import_model(bad, name="bad")
    assert not (home / "models" / "bad").exists()


def test_pickle_only_model_is_refused_unless_allowed(store, tiny_model_src, tmp_path):
    bad = copy_model(tiny_model_src, tmp_path / "pickled")
    (bad / "model.safetensors").rename(bad / "pytorch_model.bin")
    with pytest.raises(UnsafeContent, match="`allow_pickle`"):
        store.import_model(bad, name="pickled")
    summary = store.import_model(bad, name="pickled", allow_pickle=True)
    assert summary.name == "pickled"


def test_pickle_beside_safetensors_is_left_out(store, tiny_model_src, tmp_path):
    both = copy_model(tiny_model_src, tmp_path / "both")
    (both / "training_args.bin").write_bytes(b"\x80\x04K\x01.")
    store.import_model(both, name="both")
    files = {f.path for f in store.model_info("both").files}
    assert "training_args.bin" not in files and "model.safetensors" in files


def test_remote_code_config_is_refused(store, tiny_model_src, tmp_path):
    bad = copy_model(tiny_model_src, tmp_path / "remote")
    config = json.loads((bad / "config.json").read_text())
    config["auto_map"] = {"AutoModelForCausalLM": "modeling_evil.Evil"}
    (bad / "config.json").write_text(json.dumps(config))
    with pytest.raises(UnsafeContent, match="remote code"):
        store.import_model(bad, name="remote")


def test_cli_errors_are_one_line(cli, tiny_model_src, tmp_path):
    assert_one_line_error(cli("model", "info", "ghost"), "no model named")
    assert_one_line_error(cli("model", "import", str(tmp_path / "nowhere")), "no folder")
    assert_one_line_error(cli("model", "import", str(tiny_model_src), "--name", "../escape"), "not allowed")
    assert_one_line_error(cli("model", "pull", "not-a-repo-id"), "ORG/NAME")
    assert cli("model", "import", str(tiny_model_src), "--name", "ok").returncode == 0
    assert_one_line_error(cli("model", "import", str(tiny_model_src), "--name", "ok"), "exists already")


def test_rm_asks_and_removes_everything(tiny_store, cli, home):
    tiny_store.create_adapter("tiny", "qa")
    worktree = next((home / "models" / "working").iterdir())
    assert_one_line_error(cli("model", "rm", "tiny"), "--yes")
    assert (home / "models" / "tiny").is_dir()
    result = cli("model", "rm", "tiny", "--yes")
    assert result.returncode == 0, result.stderr
    assert not (home / "models" / "tiny").exists() and not worktree.exists()
    assert json.loads(cli("model", "list", "--json").stdout) == []

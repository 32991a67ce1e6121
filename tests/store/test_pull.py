"""`hyprstream model pull` end to end: the real CLI against a fake hub on 127.0.0.1 (tests/hubserver.py),
a tiny real model, the real store. The weights end up on disk once."""

from __future__ import annotations

import json
import os

from tests.helpers import assert_one_line_error, git

REPO = "tinyorg/tiny-chat"


def test_pull_imports_the_model_with_its_source_and_stores_weights_once(hub_server, tiny_model_src, cli, home, tmp_path):
    hub_repo = hub_server.add_repo(REPO, tiny_model_src)
    result = cli("model", "pull", REPO)
    assert result.returncode == 0, result.stderr
    assert "Pulled tinyorg/tiny-chat as tiny-chat" in result.stdout
    repo = home / "models" / "tiny-chat"
    assert git(repo, "fsck", "--full", "--strict").returncode == 0
    assert "Git LFS fsck OK" in git(repo, "lfs", "fsck").stdout
    message = git(repo, "log", "-1", "--format=%B", "main").stdout
    assert "source: hf://tinyorg/tiny-chat" in message and f"revision: {hub_repo.commit}" in message
    weights = repo / "model.safetensors"
    assert weights.read_bytes() == (tiny_model_src / "model.safetensors").read_bytes()
    # one inode shared by the HF cache blob, the LFS object and the working tree
    assert os.stat(weights).st_nlink == 3
    cache_blobs = list((tmp_path / "hf-home").rglob("blobs/*"))
    assert any(os.path.samefile(b, weights) for b in cache_blobs)
    rows = json.loads(cli("model", "list", "--json").stdout)
    assert rows[0]["name"] == "tiny-chat" and rows[0]["source"] == "hf://tinyorg/tiny-chat"


def test_pull_with_corrupt_weights_is_refused_and_leaves_nothing(hub_server, tiny_model_src, cli, home):
    hub_server.add_repo(REPO, tiny_model_src)
    hub_server.corrupt(REPO, "model.safetensors")
    assert_one_line_error(cli("model", "pull", REPO, "--name", "bad"), "sha256")
    assert not (home / "models" / "bad").exists()
    assert json.loads(cli("model", "list", "--json").stdout) == []


def test_pull_errors_are_one_line(hub_server, tiny_model_src, cli):
    assert_one_line_error(cli("model", "pull", "nobody/nothing"), "no model nobody/nothing")
    hub_server.add_repo(REPO, tiny_model_src)
    assert cli("model", "pull", REPO, "--name", "once").returncode == 0
    assert_one_line_error(cli("model", "pull", REPO, "--name", "once"), "exists already")
    assert_one_line_error(cli("model", "pull", REPO, "--revision", "no-such-branch", "--name", "x"), "revision")

"""Adapters as branches: create, resolve, checkpoint commits, tags, log, rollback, reading any
commit; plain git sees the same history."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from hyprstream_tui.errors import Conflict, InvalidInput, NotFound
from hyprstream_tui.store.lfs import LfsObjects
from tests.helpers import assert_one_line_error, git


def write_checkpoint(worktree: Path, step: int) -> None:
    """What a trainer does: new files replaced atomically into the worktree, never in place."""
    adapter = worktree / "adapter"
    tmp = adapter / f".tmp-{step}.safetensors"
    save_file({"base_model.model.layers.0.self_attn.q_proj.lora_A.weight": np.full((8, 64), step, np.float32)}, str(tmp))
    os.replace(tmp, adapter / "adapter_model.safetensors")
    (worktree / "metrics").mkdir(exist_ok=True)
    with open(worktree / "metrics" / "steps.jsonl", "a") as fh:
        fh.write(json.dumps({"step": step, "loss": 1.0 / step}) + "\n")


@pytest.fixture
def adapter(tiny_store):
    return tiny_store.create_adapter("tiny", "qa", rank=4, alpha=8)


def checkpoints(store, n: int) -> list:
    wt = store.worktree("tiny", "qa")
    out = []
    for step in range(1, n + 1):
        write_checkpoint(wt, step * 10)
        out.append(store.commit_checkpoint("tiny", "qa", step=step * 10, metrics={"loss": 1.0 / step, "lr": 0.01, "samples": 4}))
    return out


def test_create_records_name_config_and_worktree(tiny_store, adapter, home):
    repo = home / "models" / "tiny"
    assert adapter.branch == f"adapter/{adapter.uuid}"
    assert git(repo, "config", f"hyprstream-adapter.{adapter.uuid}.name").stdout.strip() == "qa"
    meta = json.loads(git(repo, "show", f"{adapter.branch}:adapter/hyprstream.json").stdout)
    assert meta["name"] == "qa" and meta["base_commit"] == tiny_store.head("tiny")
    config = json.loads(git(repo, "show", f"{adapter.branch}:adapter/adapter_config.json").stdout)
    assert config["peft_type"] == "LORA" and config["r"] == 4 and config["lora_alpha"] == 8
    assert config["target_modules"] == ["q_proj", "v_proj"]
    worktree = home / "models" / "working" / adapter.uuid
    assert (worktree / "adapter" / "adapter_config.json").is_file()
    assert os.path.samefile(worktree / "model.safetensors", repo / "model.safetensors")
    assert (repo / ".git" / "worktrees" / f"adapter-{adapter.uuid}").is_dir()
    assert f"{worktree}  " in git(repo, "worktree", "list").stdout and f"[{adapter.branch}]" in git(repo, "worktree", "list").stdout


def test_adapter_config_loads_in_peft(tiny_store, adapter, home):
    from peft import LoraConfig

    config = LoraConfig.from_pretrained(str(home / "models" / "working" / adapter.uuid / "adapter"))
    assert config.r == 4 and set(config.target_modules) == {"q_proj", "v_proj"}


def test_resolve_by_name_uuid_prefix_tag_and_commit(tiny_store, adapter):
    commits = checkpoints(tiny_store, 3)
    tiny_store.tag("tiny", "qa", "first", commit="step:10")
    assert tiny_store.resolve_adapter("tiny", "qa").tip == commits[-1].sha
    assert tiny_store.resolve_adapter("tiny", adapter.uuid).name == "qa"
    assert tiny_store.resolve_adapter("tiny", adapter.uuid[:8]).name == "qa"
    assert tiny_store.resolve_adapter("tiny", "qa/first").tip == commits[0].sha
    assert tiny_store.resolve_adapter("tiny", commits[1].sha[:10]).tip == commits[1].sha
    assert tiny_store.resolve_adapter("tiny", "qa", rev="step:20").tip == commits[1].sha
    assert tiny_store.resolve_adapter("tiny", "qa", rev="first").tip == commits[0].sha
    with pytest.raises(NotFound):
        tiny_store.resolve_adapter("tiny", "ghost")
    with pytest.raises(NotFound):
        tiny_store.resolve_adapter("tiny", "qa", rev="step:999")


def test_checkpoints_are_commits_with_metrics_and_lfs_weights(tiny_store, adapter, home):
    commits = checkpoints(tiny_store, 3)
    log = tiny_store.log("tiny", "qa")
    assert [c.summary for c in log[:3]] == ["Checkpoint at step 30", "Checkpoint at step 20", "Checkpoint at step 10"]
    assert log[-1].kind == "create"
    assert log[0].step == 30 and log[0].metrics["loss"] == pytest.approx(1 / 3, rel=1e-4) and log[0].metrics["samples"] == 4
    repo = home / "models" / "tiny"
    assert git(repo, "log", "--format=%s", adapter.branch).stdout.splitlines()[:3] == [c.summary for c in log[:3]]
    body = git(repo, "log", "-1", "--format=%b", adapter.branch).stdout
    assert "loss: 0.333333" in body and "step: 30" in body
    assert git(repo, "fsck", "--full", "--strict").returncode == 0
    lfs = git(repo, "lfs", "ls-files", "--all", "--long").stdout
    assert lfs.count("adapter/adapter_model.safetensors") == 3
    assert "Git LFS fsck OK" in git(repo, "lfs", "fsck").stdout
    # any commit's files can be read without checking it out
    first = tiny_store.read_file("tiny", commits[0].sha, "adapter/adapter_model.safetensors")
    snap = tiny_store.snapshot("tiny", commits[0].sha, "adapter")
    assert (snap / "adapter_model.safetensors").read_bytes() == first
    assert load_file(str(snap / "adapter_model.safetensors"))["base_model.model.layers.0.self_attn.q_proj.lora_A.weight"][0, 0] == 10


def test_rollback_is_a_new_commit_and_keeps_history(tiny_store, adapter, home, cli):
    commits = checkpoints(tiny_store, 3)
    result = cli("lora", "rollback", "qa", "step:10")
    assert result.returncode == 0, result.stderr
    log = tiny_store.log("tiny", "qa")
    assert log[0].kind == "rollback" and log[0].summary == f"Roll back to step 10 ({commits[0].sha[:7]})"
    assert [c.sha for c in log[1:4]] == [c.sha for c in reversed(commits)]  # nothing lost
    repo = home / "models" / "tiny"
    assert git(repo, "rev-parse", f"{log[0].sha}^{{tree}}").stdout == git(repo, "rev-parse", f"{commits[0].sha}^{{tree}}").stdout
    worktree = home / "models" / "working" / adapter.uuid
    weights = load_file(str(worktree / "adapter" / "adapter_model.safetensors"))
    assert next(iter(weights.values()))[0, 0] == 10
    assert len((worktree / "metrics" / "steps.jsonl").read_text().splitlines()) == 1
    assert git(repo, "fsck", "--full", "--strict").returncode == 0


def test_tags_are_milestones(tiny_store, adapter, home, cli):
    commits = checkpoints(tiny_store, 2)
    assert cli("lora", "tag", "tiny:qa", "v1", "--commit", "step:10").returncode == 0
    repo = home / "models" / "tiny"
    assert git(repo, "rev-parse", "qa/v1^{commit}").stdout.strip() == commits[0].sha
    assert_one_line_error(cli("lora", "tag", "qa", "v1"), "exists already")
    assert_one_line_error(cli("lora", "tag", "qa", "bad..label"), "not allowed")
    assert tiny_store.log("tiny", "qa")[1].tags == ("qa/v1",)


def test_lora_cli_list_and_log(tiny_store, adapter, cli):
    checkpoints(tiny_store, 2)
    rows = json.loads(cli("lora", "list", "--json").stdout)
    assert [(r["model"], r["name"]) for r in rows] == [("tiny", "qa")]
    log = json.loads(cli("lora", "log", "qa", "--json").stdout)
    assert [c["step"] for c in log] == [20, 10, None]
    text = cli("lora", "log", "qa").stdout
    assert "Checkpoint at step 20" in text and "loss=" in text


@pytest.mark.parametrize("kwargs", [{"rank": 0}, {"rank": -1}, {"alpha": 0}, {"dropout": 1.5},
                                    {"target_modules": ["nonexistent_proj"]}, {"target_modules": ["bad name"]}])
def test_bad_adapter_parameters_change_nothing(tiny_store, kwargs):
    with pytest.raises(InvalidInput):
        tiny_store.create_adapter("tiny", "x", **kwargs)
    assert tiny_store.list_adapters("tiny") == []


def test_duplicate_adapter_name_and_bad_names(tiny_store, adapter, cli):
    with pytest.raises(Conflict):
        tiny_store.create_adapter("tiny", "qa")
    for bad in ("../x", "a/b", "x.lock", "a..b", "@{x", ""):
        with pytest.raises(InvalidInput):
            tiny_store.create_adapter("tiny", bad)
    assert [a.name for a in tiny_store.list_adapters("tiny")] == ["qa"]
    assert_one_line_error(cli("lora", "create", "--name", "z", "--base-model", "ghost"), "no model named")
    assert_one_line_error(cli("lora", "log", "ghost"), "no adapter")


def test_stale_git_locks_do_not_block_the_next_write(tiny_store, adapter, home):
    repo = home / "models" / "tiny" / ".git"
    checkpoints(tiny_store, 1)
    (repo / "refs" / "heads" / "adapter" / f"{adapter.uuid}.lock").write_text("stale")
    (repo / "index.lock").write_text("stale")
    (repo / "worktrees" / f"adapter-{adapter.uuid}" / "index.lock").write_text("stale")
    wt = tiny_store.worktree("tiny", "qa")
    write_checkpoint(wt, 99)
    info = tiny_store.commit_checkpoint("tiny", "qa", step=99, metrics={"loss": 0.1})
    assert tiny_store.log("tiny", "qa")[0].sha == info.sha
    assert git(repo.parent, "fsck", "--full", "--strict").returncode == 0


def test_lfs_objects_are_verified(tiny_store, adapter, home):
    checkpoints(tiny_store, 1)
    from hyprstream_tui.store.lfs import Pointer

    repo = home / "models" / "tiny"
    pointer = Pointer.parse(git(repo, "cat-file", "-p", f"{adapter.branch}:adapter/adapter_model.safetensors").stdout.encode())
    assert LfsObjects(repo / ".git").verify(pointer)

"""End to end through the real `hyprstream` command (subprocesses, HYPRSTREAM_HOME in tmp_path):
create an adapter, add 4 Q&A samples, train in the background, follow it, refuse a second writer,
stop it, resume it in the foreground, then the adapter answers every question exactly (the base
does not), and the exported file gives the same answers in plain PEFT. Bad input: one-line errors
and nothing changed."""

from __future__ import annotations

import json
import re
import time

from hyprstream_tui.engine.train.job import train_status
from tests.helpers import assert_one_line_error, git
from tests.train.helpers import ANSWERS, QA, QUESTIONS, adapter_answers, greedy_answers, load_base

STEPS = 200  # default lr (3e-2 here): memorised after about 50; the rest lets the background run be watched


def _state(store) -> dict:
    """Every ref of every model: what 'nothing changed' compares."""
    out = {}
    for m in store.list_models():
        refs = git(store.model_dir(m.name), "for-each-ref", "--format=%(refname) %(objectname)").stdout
        out[m.name] = sorted(refs.splitlines())
    return out


def _infer(cli, spec: str, question: str) -> str:
    result = cli("infer", spec, "--prompt", question, "--temperature", "0", "--max-tokens", "40", "--json")
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)["text"]


def test_train_end_to_end_through_the_cli(cli, store, tiny_model_src, tmp_path):
    assert cli("model", "import", tiny_model_src, "--name", "tiny").returncode == 0
    assert cli("lora", "create", "--name", "qa", "--base-model", "tiny", "--rank", "8", "--alpha", "16",
               "--target-modules", "q_proj,v_proj").returncode == 0
    for q, a in QA[:2]:  # one at a time, then the rest from a JSONL file
        added = cli("lora", "train", "sample", "qa", "--input", q, "--output", a)
        assert added.returncode == 0 and "sample" in added.stdout, added.stderr
    rows = tmp_path / "rest.jsonl"
    rows.write_text("".join(json.dumps({"input": q, "output": a}) + "\n" for q, a in QA[2:]))
    added = cli("lora", "train", "sample", "qa", "--file", rows)
    assert added.returncode == 0, added.stderr
    assert "4 in all" in added.stdout

    started = cli("lora", "train", "start", "qa", "--steps", STEPS, "--checkpoint-every", "1", "--detach")
    assert started.returncode == 0 and "in the background" in started.stdout, started.stderr
    # A second writer is refused at once while the first holds the adapter.
    assert_one_line_error(cli("lora", "train", "start", "qa", "--steps", "5"), "training already")
    deadline = time.monotonic() + 120
    while (train_status(store, "tiny", "qa").step or 0) < 3:
        assert time.monotonic() < deadline, "the background run did not start"
        time.sleep(0.05)
    status = json.loads(cli("lora", "train", "status", "qa", "--json").stdout)
    assert status["running"] and status["pid"] and status["target"] == STEPS and status["loss"] > 0
    assert re.search(rf"qa \(tiny\): (training|checkpointing), pid \d+, step \d+/{STEPS}, loss [\d.]+ ",
                     cli("lora", "train", "status", "qa").stdout)
    stopped = cli("lora", "train", "stop", "qa")
    assert stopped.returncode == 0 and "Stopped qa" in stopped.stdout, stopped.stderr
    status = json.loads(cli("lora", "train", "status", "qa", "--json").stdout)
    assert not status["running"] and 3 <= status["last_checkpoint_step"] < STEPS
    stop_step = status["last_checkpoint_step"]
    assert f"Checkpoint at step {stop_step}" in cli("lora", "log", "qa").stdout

    resumed = cli("lora", "train", "start", "qa", "--checkpoint-every", "50", timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    assert f"Resuming qa on tiny from step {stop_step} to {STEPS}" in resumed.stdout
    assert f"Finished qa at step {STEPS}" in resumed.stdout

    model_dir = store.model_dir("tiny")
    assert git(model_dir, "fsck", "--full", "--strict", check=False).returncode == 0
    # `hyprstream infer` answers with the adapter, and without it the base does not (one question
    # each: every process loads torch; all four are checked in this process just below)
    assert _infer(cli, "tiny:qa", QUESTIONS[0]) == ANSWERS[0]
    assert _infer(cli, "tiny", QUESTIONS[0]) != ANSWERS[0]
    worktree = store.worktree("tiny", "qa")
    assert adapter_answers(model_dir, worktree / "adapter") == list(ANSWERS)
    base, tok = load_base(model_dir)
    assert all(got != want for got, want in zip(greedy_answers(base, tok), ANSWERS))

    out = tmp_path / "qa.safetensors"
    exported = cli("lora", "export", "qa", "--output", out)
    assert exported.returncode == 0, exported.stderr
    from peft import LoraConfig, get_peft_model, set_peft_model_state_dict
    from safetensors import safe_open
    from safetensors.torch import load_file

    with safe_open(str(out), "pt") as fh:
        meta = fh.metadata()
    assert meta["adapter_commit"] == store.resolve_adapter("tiny", "qa").tip
    base, tok = load_base(model_dir)
    config = {k: v for k, v in json.loads(meta["peft_config"]).items() if k != "peft_type"}
    model = get_peft_model(base, LoraConfig(**config))
    set_peft_model_state_dict(model, load_file(str(out)))
    assert greedy_answers(model, tok) == list(ANSWERS)


def test_bad_input_is_one_line_and_changes_nothing(cli, qa_store, tmp_path):
    qa_store.create_adapter("tiny", "empty")
    before = _state(qa_store)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"input": "q", "output": "a"}\n{"input": "q", "output": "a"}\n{"input": "q"}\n')
    cases = [
        (("lora", "create", "--name", "r0", "--base-model", "tiny", "--rank", "0"), "--rank must be a positive whole number, got 0."),
        (("lora", "create", "--name", "a0", "--base-model", "tiny", "--alpha", "0"), "--alpha must be positive, got 0.0."),
        (("lora", "create", "--name", "t0", "--base-model", "tiny", "--target-modules", "c_attn,c_proj"), "none of the target"),
        (("lora", "train", "start", "qa", "--learning-rate", "0"), "--learning-rate must be greater than 0, got 0.0."),
        (("lora", "train", "start", "qa", "--learning-rate", "-0.1"), "--learning-rate"),
        (("lora", "train", "start", "qa", "--steps", "5", "--epochs", "1"), "Give --steps or --epochs, not both."),
        (("lora", "train", "start", "nope"), "nope"),
        (("lora", "train", "start", "empty"), "no samples"),
        (("lora", "train", "start", "empty", "--detach"), "no samples"),
        (("lora", "train", "sample", "qa", "--file", bad), "bad.jsonl line 3"),
        (("lora", "train", "sample", "qa", "--input", "q"), "--output"),
        (("lora", "train", "sample", "nope", "--input", "q", "--output", "a"), "nope"),
        (("lora", "train", "stop", "qa"), "not training"),
        (("lora", "export", "empty", "--output", tmp_path / "e.safetensors"), "no trained weights"),
        (("lora", "merge", "qa", "--name", "tiny"), "exists already: choose another --name."),
    ]
    for args, needle in cases:
        assert_one_line_error(cli(*args), needle)
    assert _state(qa_store) == before
    assert not (tmp_path / "e.safetensors").exists()
    assert not train_status(qa_store, "tiny", "qa").running

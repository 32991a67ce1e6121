"""GGUF import (engine/gguf.py): files written by gguf-py's own writer in F32, F16, BF16 and Q8_0
go through transformers' GGUF loader into an ordinary model repository, losing nothing; anything
else gives one line and writes nothing. The real SmolLM2 GGUF is imported in tests/realmodel/."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from hyprstream_tui.store.commits import parse_trailers
from tests.helpers import assert_one_line_error, git
from tests.gguf_files import write_other_arch_gguf, write_tiny_gguf

EXPECTED_DTYPE = {"F32": "float32", "F16": "float16", "BF16": "bfloat16", "Q8_0": "float32"}


@pytest.fixture(scope="module")
def ggufs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("gguf")
    return {t: write_tiny_gguf(root / f"tiny-{t}.gguf", tensor_type=t) for t in EXPECTED_DTYPE}


def _dequantized(path: Path) -> dict:
    """What transformers' GGUF loader itself gives in float32 (the reference)."""
    import shutil
    import tempfile

    import torch
    from transformers import AutoModelForCausalLM

    with tempfile.TemporaryDirectory() as tmp:
        shutil.copy(path, Path(tmp) / "m.gguf")
        model = AutoModelForCausalLM.from_pretrained(tmp, gguf_file="m.gguf", dtype=torch.float32)
    return {k: v.clone() for k, v in model.state_dict().items()}


def _no_leftovers(home: Path) -> None:
    cache = home / "cache"
    assert not list(cache.glob("gguf-*")) if cache.exists() else True
    models = home / "models"
    assert not [p for p in models.iterdir() if p.name.startswith(".")] if models.exists() else True


@pytest.mark.parametrize("tensor_type", sorted(EXPECTED_DTYPE))
def test_import_keeps_every_value_in_the_smallest_exact_dtype(store, ggufs, tensor_type):
    import torch
    from safetensors.torch import load_file

    from hyprstream_tui.engine.gguf import import_gguf

    src = ggufs[tensor_type]
    summary = import_gguf(store, src, name=f"g-{tensor_type.lower()}")
    assert summary.dtype == EXPECTED_DTYPE[tensor_type] and summary.architecture == "LlamaForCausalLM"
    repo = store.model_dir(summary.name)
    stored = load_file(repo / "model.safetensors")
    reference = _dequantized(src)
    for key, tensor in stored.items():
        assert tensor.dtype == getattr(torch, EXPECTED_DTYPE[tensor_type]), key
        assert torch.equal(tensor.float(), reference[key]), f"{key} lost precision"
    # One import commit that says where the bytes came from.
    message = git(repo, "log", "-1", "--format=%B").stdout
    trailers = parse_trailers(message)
    assert message.startswith(f"Import {src.name}")
    assert trailers["gguf-sha256"] == hashlib.sha256(src.read_bytes()).hexdigest()
    assert int(trailers["gguf-size"]) == src.stat().st_size and trailers["gguf-architecture"] == "llama"
    assert trailers["dtype"] == EXPECTED_DTYPE[tensor_type] and trailers["dtype-reason"]
    assert tensor_type in trailers["gguf-types"] and "F32" in trailers["gguf-types"]
    assert git(repo, "rev-list", "--count", "main").stdout.strip() == "1"
    # Config, tokenizer and chat template are ordinary blobs; the weights an LFS object plain git-lfs checks.
    files = set(git(repo, "ls-files").stdout.split())
    assert {"config.json", "tokenizer.json", "tokenizer_config.json", "model.safetensors"} <= files
    assert "chat_template.jinja" in files or "chat_template" in (repo / "tokenizer_config.json").read_text()
    assert "model.safetensors" in git(repo, "lfs", "ls-files").stdout
    git(repo, "fsck", "--full", "--strict")
    git(repo, "lfs", "fsck")
    _no_leftovers(store.paths.home)


def test_an_imported_gguf_answers_like_transformers_reading_the_file(store, ggufs):
    """The stored model gives the logits transformers gives from the GGUF itself."""
    import torch
    from transformers import AutoModelForCausalLM

    from hyprstream_tui.engine.gguf import import_gguf

    summary = import_gguf(store, ggufs["Q8_0"], name="q8")
    ids = torch.tensor([[5, 17, 99, 3, 250]])
    ours = AutoModelForCausalLM.from_pretrained(store.model_dir(summary.name)).eval()
    reference = AutoModelForCausalLM.from_pretrained(ggufs["Q8_0"].parent, gguf_file=ggufs["Q8_0"].name,
                                                     dtype=torch.float32).eval()
    with torch.no_grad():
        assert torch.equal(ours(ids).logits, reference(ids).logits)


def test_stored_dtype_rule():
    import torch

    from hyprstream_tui.engine.gguf import stored_dtype

    half = {"w": torch.randn(8, 8).half().float(), "norm": torch.ones(8)}
    assert stored_dtype(half, {"F16": 7, "F32": 2})[0] == "float16"
    brain = {"w": torch.randn(8, 8).bfloat16().float(), "norm": torch.ones(8)}
    assert stored_dtype(brain, {"BF16": 7, "F32": 2})[0] == "bfloat16"
    full = {"w": torch.randn(8, 8), "norm": torch.ones(8)}
    name, why = stored_dtype(full, {"Q4_1": 7, "F32": 2})
    assert name == "float32" and "Q4_1" in why


def test_cli_imports_a_gguf_file_and_refuses_bad_ones_in_one_line(cli, home, ggufs, tmp_path):
    ok = cli("model", "import", ggufs["F16"], "--name", "tiny-gguf")
    assert ok.returncode == 0, ok.stderr
    assert "Imported tiny-gguf" in ok.stdout and "float16" in ok.stdout
    assert "Converting" not in ok.stderr  # transformers' own progress bar stays off the terminal
    # An architecture transformers cannot read: one line naming what it can; nothing written.
    other = write_other_arch_gguf(tmp_path / "rwkv.gguf")
    assert_one_line_error(cli("model", "import", other), "rwkv6", "llama", "qwen2")
    # Truncated, hostile, missing: one line each, nothing written.
    data = ggufs["F32"].read_bytes()
    (tmp_path / "cut.gguf").write_bytes(data[: len(data) // 2])
    assert_one_line_error(cli("model", "import", tmp_path / "cut.gguf"), "cut.gguf")
    (tmp_path / "short.gguf").write_bytes(data[:100])
    assert_one_line_error(cli("model", "import", tmp_path / "short.gguf"), "not a valid GGUF")
    (tmp_path / "junk.gguf").write_bytes(b"GGUF" + b"\xff" * 64)
    assert_one_line_error(cli("model", "import", tmp_path / "junk.gguf"), "junk.gguf")
    assert_one_line_error(cli("model", "import", tmp_path / "missing.gguf"), "missing.gguf")
    # A file that is no GGUF gets the folder import's word; a GGUF by its magic needs no suffix.
    (tmp_path / "model.safetensors").write_bytes(b"\0" * 16)
    assert_one_line_error(cli("model", "import", tmp_path / "model.safetensors"), "give the folder")
    (tmp_path / "blob-sha256-ab12").write_bytes(ggufs["BF16"].read_bytes())  # as Ollama names its files
    blob = cli("model", "import", tmp_path / "blob-sha256-ab12", "--name", "from-blob")
    assert blob.returncode == 0 and "bfloat16" in blob.stdout, blob.stderr
    # A name taken: refused before any work.
    assert_one_line_error(cli("model", "import", ggufs["F16"], "--name", "tiny-gguf"), "exists already")
    listed = cli("model", "list", "--json")
    assert sorted(m["name"] for m in __import__("json").loads(listed.stdout)) == ["from-blob", "tiny-gguf"]
    _no_leftovers(home)


def test_a_killed_conversion_is_swept_by_the_next_import(store, ggufs):
    """A conversion folder left by a killed process (a pid that is gone) goes with the next import."""
    from hyprstream_tui.engine.gguf import import_gguf

    cache = store.paths.cache
    cache.mkdir(parents=True)
    dead = cache / "gguf-999999999-deadbeef.incomplete"
    (dead / "sub").mkdir(parents=True)
    import_gguf(store, ggufs["F32"], name="after-kill")
    assert not dead.exists()
